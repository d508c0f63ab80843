"""Writing to output_dir: refuse to clobber an earlier run, and write files and folders atomically."""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from modules.errors import UserError

RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "adapter", "checkpoints", "wandb")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Make sure output_dir holds no earlier run, unless --overwrite says to replace it.

    Only the files a run writes (RUN_ARTIFACTS) count and only those are removed on --overwrite;
    anything else a user keeps in the folder is left alone.
    """
    existing = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}). Choose one: "
            f"another folder (output_dir=runs/new-name), or --overwrite to replace that run."
        )
    for name in existing:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o666 & ~_umask())  # temp files are private; the result should not be
    os.replace(handle.name, path)


def write_dir_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary folder beside `path`, then swap it into place by renames."""
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = path.with_name(f".{path.name}.old")
    if path.exists():
        os.replace(path, previous)
    os.replace(staging, path)
    shutil.rmtree(previous, ignore_errors=True)
