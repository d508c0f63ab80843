"""Training end to end on every data format, and ChatML taught to a base model whose tokenizer has no template."""

import json

import pytest
import torch
from conftest import base_tokenizer, save_tiny_llama, write_jsonl
from safetensors.torch import load_file
from test_chat_merge import run_tool
from test_train import train_in_process

from modules.adapter import inspect_adapter, load_with_adapter

pytestmark = pytest.mark.slow
QUESTIONS = ["Is the sea wide?", "How many days are in a week?", "What is the capital of France?"]


def rows_in(fmt: str, count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        question, answer = f"{QUESTIONS[i % 3]} ({i})", "Ahoy! " + "the ship is fast, matey. " * (1 + i % 3) + "Arr!"
        rows.append(
            {
                "messages": {
                    "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                },
                "sharegpt": {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]},
                "alpaca": {"instruction": question, "input": "", "output": answer},
                "prompt_completion": {"prompt": question + " ", "completion": answer},
                "text": {"text": f"{question} {answer}"},
            }[fmt]
        )
    return rows


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion", "text"])
def test_every_format_trains_end_to_end_with_packing(tmp_path, tiny_model_dir, fmt, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_in(fmt))
    result = train_in_process(tmp_path, tiny_model_dir, data, "run", "train.max_steps=10", "train.micro_batch_size=1")
    out = capsys.readouterr().out
    assert f"format {fmt} (detected" in out and "packed into" in out and "[[" in out
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base_model_dir(request, tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("base"), base_tokenizer(), tie_word_embeddings=request.param)


def test_a_base_model_learns_chatml_tokens_and_the_adapter_carries_them(tmp_path, base_model_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows_in("messages"))
    result = train_in_process(tmp_path, base_model_dir, data, "run", "train.max_steps=10", "train.micro_batch_size=1")
    assert "chat template: ChatML (the tokenizer has none" in capsys.readouterr().out
    tokenizer, model = result.tokenizer, result.model
    chatml_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer.eos_token == "<|im_end|>"

    # The new tokens' rows were trained (in fp32), in the embedding and, unless tied, in lm_head.
    deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    tied = model.config.tie_word_embeddings
    assert len(deltas) == (1 if tied else 2) and all(
        p.dtype == torch.float32 and p.requires_grad for p in deltas.values()
    )
    embedding = model.get_input_embeddings().token_adapter  # PEFT's TrainableTokensLayer
    moved = (embedding.trainable_tokens_delta["default"] - embedding.trainable_tokens_original["default"].float()).abs()
    assert moved.max() > 1e-3, "the ChatML rows did not train"

    adapter = result.output_dir / "adapter"
    saved = load_file(adapter / "adapter_model.safetensors")
    saved_rows = [key for key in saved if "trainable_tokens_delta" in key]
    assert any("embed_tokens" in key for key in saved_rows) and (tied or any("lm_head" in key for key in saved_rows))
    saved_tokenizer = json.loads((adapter / "tokenizer_config.json").read_text())
    assert (
        saved_tokenizer["eos_token"] == "<|im_end|>" and "<|im_start|>" in (adapter / "chat_template.jinja").read_text()
    )

    # Reloaded for chat (4-bit, as trained) it is the same model, with no manual step.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded_tokenizer = AutoTokenizer.from_pretrained(adapter)
    prompt = [{"role": "user", "content": "Is the sea wide?"}]
    inputs = reloaded_tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert inputs["input_ids"][0].tolist().count(chatml_ids[0]) == 2  # user turn, then the generation prompt
    model.eval()
    with torch.no_grad():
        trained_logits = model(**inputs.to(model.device)).logits.float()
        info = inspect_adapter(adapter)
        reloaded = load_with_adapter(info, "4bit", model.device, reloaded_tokenizer)  # bf16 compute on a GPU
        error = (reloaded(**inputs.to(model.device)).logits.float() - trained_logits).abs().max()
        assert error <= (1e-5 if model.device.type == "cpu" else 1e-2) * trained_logits.abs().max()
        inputs = inputs.to("cpu")
        exact = load_with_adapter(info, "fp32", torch.device("cpu"), reloaded_tokenizer)(**inputs).logits

    # Merged, the trained rows are part of a plain model that stops generating at <|im_end|>.
    merged_dir = tmp_path / "merged"
    done = run_tool("merge.py", str(adapter), str(merged_dir), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.get_input_embeddings().num_embeddings == len(reloaded_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, exact, rtol=1e-4, atol=1e-4)
    trained_rows = embedding.trainable_tokens_delta["default"].detach().cpu()
    assert torch.equal(merged.get_input_embeddings().weight[chatml_ids], trained_rows)
    assert chatml_ids[1] in merged.generation_config.eos_token_id


def test_a_chatml_run_resumes_exactly(tmp_path, base_model_dir):
    import shutil

    from conftest import write_config
    from test_train import run_cli

    data = write_jsonl(tmp_path / "rows.jsonl", rows_in("messages"))
    full = tmp_path / "full"
    config = write_config(
        tmp_path / "run.yaml",
        base_model_dir,
        data,
        full,
        train={"max_steps": 6, "micro_batch_size": 1},
        checkpoint={"every_steps": 3},
        lora={"dropout": 0.0},
    )
    done = run_cli("--config", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "adapter")
    again = run_cli(
        "--config", str(config), f"output_dir={resumed}", "--resume", str(resumed / "checkpoints" / "step-000003")
    )
    assert again.returncode == 0, again.stderr[-3000:]
    expected, got = (load_file(folder / "adapter" / "adapter_model.safetensors") for folder in (full, resumed))
    assert expected.keys() == got.keys() and any("trainable_tokens_delta" in key for key in got)
    assert max((expected[k].float() - got[k].float()).abs().max().item() for k in expected) <= 1e-6
