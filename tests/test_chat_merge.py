"""chat.py and merge.py on an adapter trained here, on a tiny random Llama."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, nf4, write_config, write_jsonl
from test_train import run_cli

from modules.adapter import inspect_adapter, load_with_adapter
from modules.errors import UserError
from modules.generation import GenerationSettings, reply

pytestmark = pytest.mark.slow
PROMPT = [{"role": "user", "content": "Is the sea wide?"}]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("trained")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Is the sea wide? ({i})"},
                {"role": "assistant", "content": "Ahoy! The sea is wide, matey. Arr!"},
            ]
        }
        for i in range(16)
    ]
    data = write_jsonl(root / "train.jsonl", rows)
    config = write_config(root / "run.yaml", tiny_model_dir, data, root / "run", train={"max_steps": 8})
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "adapter"


def run_tool(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def test_adapter_folder_carries_a_model_card(adapter_dir, tiny_model_dir):
    card = (adapter_dir / "README.md").read_text()
    assert f"base_model: {tiny_model_dir}" in card and "library_name: peft" in card
    assert "8 optimizer steps of 4 rows" in card and "AutoPeftModelForCausalLM.from_pretrained" in card
    assert "at the first logged step" in card and "max_steps: 8" in card


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_model_equals_base_plus_adapter_and_needs_no_peft(adapter_dir, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    result = run_tool("merge.py", str(adapter_dir), str(merged_dir), "--dtype", dtype)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {p.name for p in merged_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(n.startswith("adapter") for n in names)
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers
    assert merged.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]

    def logits(load: str, adapter: bool = True):
        model = load_with_adapter(inspect_adapter(adapter_dir), load, torch.device("cpu"), tokenizer)
        with torch.no_grad():
            if adapter:
                return model(**inputs).logits.float()
            with model.disable_adapter():
                return model(**inputs).logits.float()

    reference = logits("fp32")  # base + adapter, unmerged, exact
    scale = reference.abs().max()
    assert (logits("fp32", adapter=False) - reference).abs().max() > 0.05 * scale, "the adapter must matter"
    with torch.no_grad():
        error = (merged(**inputs).logits.float() - reference).abs().max()
    if dtype == "fp32":
        assert error <= 1e-4 * scale
    else:  # merging in bf16 may cost no more than running the unmerged model in bf16 does
        bf16_noise = (logits("bf16") - reference).abs().max()
        assert error <= 2 * bf16_noise + 1e-3 * scale, f"merged error {error:.4f}, bf16 noise {bf16_noise:.4f}"


def test_merge_never_writes_over_an_existing_folder(adapter_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    result = run_tool("merge.py", str(adapter_dir), str(tmp_path / "taken"))
    assert result.returncode == 2 and "already exists and is not empty" in result.stderr
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("gguf_type", ["bf16", "q8_0"])
def test_merge_to_gguf_reads_back_in_transformers_like_the_merged_model(adapter_dir, tmp_path, gguf_type):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = tmp_path / "out" / "model.gguf"
    merged_dir = tmp_path / "merged"
    result = run_tool("merge.py", str(adapter_dir), str(merged_dir), "--gguf", str(gguf_file), "--gguf-type", gguf_type)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"llama-cli -m {gguf_file}" in result.stdout
    modelfile = (tmp_path / "out" / "model.Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the training tokenizer
    read_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    chat = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert read_tokenizer(chat)["input_ids"] == tokenizer(chat)["input_ids"]
    assert read_tokenizer.chat_template == tokenizer.chat_template and read_tokenizer.eos_token == tokenizer.eos_token

    ids = torch.tensor([tokenizer(chat)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        expected, got = merged(ids).logits, from_gguf(ids).logits
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"{gguf_type}: largest logit difference {error:.2e} of the largest logit")  # for the record (pytest -s)
    # bf16: the merged bf16 weights unchanged. q8_0: int8 blocks of 32 with an fp16 scale each (a
    # weight's error is at most 1/254 of its block's largest) cost this tiny random model a few %.
    assert error == 0 if gguf_type == "bf16" else error < 0.1

    again = run_tool("merge.py", str(adapter_dir), "--gguf", str(gguf_file))
    assert again.returncode == 2 and "--overwrite" in again.stderr  # refused before any weight loads
    replaced = run_tool("merge.py", str(adapter_dir), "--gguf", str(gguf_file), "--overwrite", "--gguf-type", "f16")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert sorted(p.name for p in gguf_file.parent.iterdir()) == ["model.Modelfile", "model.gguf"]  # no leftovers


def test_chat_prompt_answers_once_like_the_adapter_does(adapter_dir):
    from transformers import AutoTokenizer

    result = run_tool("chat.py", str(adapter_dir), "--prompt", "Is the sea wide?", "--greedy", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = load_with_adapter(inspect_adapter(adapter_dir), "4bit", torch.device("cpu"), tokenizer)
    expected = reply(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=8, greedy=True))
    assert expected and result.stdout.strip().endswith(expected)


def test_interactive_chat_keeps_history_resets_and_exits(adapter_dir):
    result = run_tool(
        "chat.py",
        str(adapter_dir),
        "--greedy",
        "--max-new-tokens",
        "4",
        stdin="Is the sea wide?\nAnd the ship?\n/reset\nHello\n/exit\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bot> ") == 3 and result.stdout.count("you> ") == 5


def test_compare_writes_base_and_tuned_answers_and_behaviour_rates(adapter_dir, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "Is the sea wide?", "expect": "^Ahoy"}, {"prompt": "Is the ship fast?"}]
    )
    out = tmp_path / "compare.jsonl"
    result = run_tool(
        "chat.py", str(adapter_dir), "--compare", str(prompts), "--out", str(out), "--max-new-tokens", "6"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["Is the sea wide?", "Is the ship fast?"]
    assert "expect" in rows[0] and "expect" not in rows[1]
    assert "Taught behaviour (answers matching their 'expect'): base" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    quantization = nf4(torch.float32)
    plain_base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization, dtype=torch.float32, device_map={"": "cpu"}
    )
    settings = GenerationSettings(max_new_tokens=6, greedy=True)
    assert rows[0]["base"] == reply(plain_base, tokenizer, PROMPT, settings)  # really the base, adapter off
    assert rows[0]["tuned"] != rows[0]["base"]


def test_bad_adapter_folders_and_mismatched_bases_exit_2(adapter_dir, tmp_path, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    cases = []
    cases.append((run_tool("chat.py", str(tmp_path), "--prompt", "hi"), "is not an adapter folder"))
    cases.append((run_tool("merge.py", str(tiny_model_dir), str(tmp_path / "m")), "holds a full model"))
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (no_tokenizer / name).write_bytes((adapter_dir / name).read_bytes())
    cases.append((run_tool("chat.py", str(no_tokenizer), "--prompt", "hi"), "has no tokenizer"))
    wider = tmp_path / "wider-base"
    config = json.loads((tiny_model_dir / "config.json").read_text()) | {"hidden_size": 128}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(wider)
    cases.append((run_tool("chat.py", str(adapter_dir), "--base", str(wider), "--prompt", "hi"), "does not fit base"))
    bad_prompts = write_jsonl(tmp_path / "bad.jsonl", [{"question": "hi"}])
    cases.append((run_tool("chat.py", str(adapter_dir), "--compare", str(bad_prompts)), "line 1: needs a string"))
    for result, message in cases:
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr and "Traceback" not in result.stderr


def test_inspect_adapter_reads_the_runs_quant_settings(adapter_dir):
    info = inspect_adapter(adapter_dir)
    assert info.quant["quant_type"] == "nf4" and info.quant["double_quant"] is True
    with pytest.raises(UserError, match="is not a folder"):
        inspect_adapter(adapter_dir / "nope")
