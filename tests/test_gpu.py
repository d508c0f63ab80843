"""The GPU path: bf16 autocast, NF4 matmuls on CUDA, CUDA peak memory. Skipped without a GPU."""

import pytest
import torch
from conftest import write_config
from test_train import read_metrics, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_run_uses_bf16_and_reports_cuda_memory(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "autocast bf16, compute bfloat16" in result.stdout
    assert "x cuda (" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert 0 < records[-1]["peak_memory_gib"] < 2  # torch's CUDA allocator, not the process RSS
