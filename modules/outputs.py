"""output_dir: claim it for one run at a time, never clobber an earlier run, write files atomically.

A run holds a lock file in output_dir (pid, host, start time) from before any weights load until
it ends, so a second run or a --resume cannot read checkpoints that the live run is rotating away.
Writes go to a temporary name beside their target and are renamed into place; when the disk is
full (or read-only) the error says what was being written and how much room is left.
"""

import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from modules.errors import UserError

RUN_ARTIFACTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.png", "adapter", "checkpoints")
WANDB_FOLDER = "wandb"  # offline runs that may never have been synced: moved aside, never deleted
LOCK_FILE = ".qlora-loop.lock"
NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(output_dir: Path) -> None:
    """output_dir must be a folder (or not exist yet) that no symlink leads out of."""
    for folder in (output_dir, *output_dir.parents):
        if folder.exists() and not folder.is_dir():
            raise UserError(
                f"output_dir {output_dir}: {folder} is a file, not a folder. Choose another output_dir "
                "(output_dir=runs/new-name) or move the file."
            )
        if folder.exists():
            break


def claim_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Make sure output_dir holds no earlier run, unless --overwrite says to replace it.

    Only the files a run writes (RUN_ARTIFACTS) count and only those are removed on --overwrite;
    anything else a user keeps in the folder is left alone, and an earlier offline W&B folder is
    moved aside rather than deleted. Every artifact is first moved into one hidden folder inside
    output_dir (renames, which cannot half-happen), so a failure leaves the earlier run as it was;
    a symlinked artifact loses only the link, never what it points to.
    """
    existing = [name for name in RUN_ARTIFACTS if os.path.lexists(output_dir / name)]
    if existing and not overwrite:
        raise UserError(
            f"output_dir {output_dir} already holds a run ({', '.join(existing)}). Choose one: --resume to "
            f"continue it, another folder (output_dir=runs/new-name), or --overwrite to replace it."
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        return
    if existing:
        _remove_artifacts(output_dir, existing)
    wandb = output_dir / WANDB_FOLDER
    if wandb.is_dir() and not wandb.is_symlink() and any(wandb.iterdir()):
        kept = output_dir / f"{WANDB_FOLDER}-replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(wandb, kept)
        print(
            f"qlora-loop: --overwrite kept the earlier run's W&B folder as {kept} (it may hold offline runs "
            f"never synced: `wandb sync {kept}/offline-run-*`, then delete it).",
            file=sys.stderr,
            flush=True,
        )


def _remove_artifacts(output_dir: Path, names: list[str]) -> None:
    """Move the named artifacts into one hidden folder (renames), putting them back if any move fails;
    only then delete that folder. A symlink is unlinked, never followed."""
    trash = output_dir / f".replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    moved: list[str] = []
    try:
        trash.mkdir()
        for name in names:
            os.rename(output_dir / name, trash / name)
            moved.append(name)
    except OSError as error:
        for name in moved:  # put back what was moved: the earlier run stays whole
            os.rename(trash / name, output_dir / name)
        shutil.rmtree(trash, ignore_errors=True)
        raise UserError(f"--overwrite: could not replace the earlier run in {output_dir} ({error}).") from None
    for name in moved:
        path = trash / name
        path.unlink() if path.is_symlink() or not path.is_dir() else shutil.rmtree(path)
    trash.rmdir()


class RunLock:
    """One run per output_dir: a lock file naming the holder. A lock left by a dead process is taken over."""

    def __init__(self):
        self.path: Path | None = None
        self.held = False
        self.created_folder = False  # removed again at release if the run left nothing in it

    def acquire(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        try:
            self.created_folder = not output_dir.exists()
            output_dir.mkdir(parents=True, exist_ok=True)
            if not self._create():
                holder = self._read()
                if self._alive(holder):
                    raise UserError(
                        f"output_dir {output_dir} is in use by another run: {self._describe(holder)} (lock file "
                        f"{self.path}). Wait for it to end or stop it first, or choose another output_dir. If that "
                        "process is gone (another machine sharing this folder), delete the lock file."
                    )
                print(
                    f"qlora-loop: taking over {self.path} from {self._describe(holder)}, which is no longer running.",
                    file=sys.stderr,
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
                if not self._create():
                    raise UserError(f"output_dir {output_dir} was claimed by another run just now; try again.")
        except OSError as error:
            raise UserError(
                f"output_dir {output_dir} cannot be written ({error.strerror}). Choose a folder on a writable "
                "disk (output_dir=PATH)."
            ) from None
        self.held = True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created_folder and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()  # a run stopped by a mistake before writing anything leaves no trace

    def _create(self) -> bool:
        import psutil

        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time()}
        with os.fdopen(handle, "w") as file:
            json.dump(me, file)
        return True

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable or half-written by a process that died at once: treat as stale

    @staticmethod
    def _alive(holder: dict) -> bool:
        import psutil

        if not holder or holder.get("host") != socket.gethostname():
            return bool(holder)  # on another machine: cannot tell, so assume it runs
        try:
            process = psutil.Process(int(holder["pid"]))
            return abs(process.create_time() - float(holder.get("started", 0))) < 1.0  # not a reused pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return False

    @staticmethod
    def _describe(holder: dict) -> str:
        if not holder:
            return "an unreadable lock"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"


@contextmanager
def room_to_write(what: str, where: Path, resume_from: Callable[[], Path | None] | None = None):
    """Turn a full or read-only disk into a UserError that says what, how much room, and where to
    resume (training) or that running it again will do (without resume_from)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        code = error.errno if isinstance(error, OSError) else _os_error_code(str(error))
        if code is None and re.fullmatch(r"\d+ requested and \d+ written", str(error)):
            code = errno.ENOSPC  # numpy's tofile reports a short write without an errno
        if code not in NO_ROOM:
            raise
        try:
            free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        newest = resume_from() if resume_from else None
        resume = (
            f"The last intact checkpoint is {newest}: make room, then continue with --resume."
            if newest
            else "No checkpoint was written yet: make room, then start again."
            if resume_from
            else "Make room, then run it again."
        )
        raise UserError(f"could not write {what} in {where} ({os.strerror(code)}; {free}). {resume}") from None


def _os_error_code(message: str) -> int | None:
    """safetensors reports a failed write as text: 'I/O error: No space left on device (os error 28)'."""
    found = re.search(r"\(os error (\d+)\)", message)
    return int(found.group(1)) if found else None


def write_text_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        try:
            handle.write(text)
            handle.flush()
        except BaseException:
            handle.close()
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, 0o666 & ~_umask())  # temp files are private; the result should not be
    os.replace(handle.name, path)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it into place; nothing is left
    behind if it fails."""
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(staging))
        os.chmod(staging, 0o666 & ~_umask())  # temp files are private; the result should not be
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


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
