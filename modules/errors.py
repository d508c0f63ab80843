"""The one error type for mistakes a user can fix, how the command line reports it, and the
third-party output kept off the user's screen because it is harmless or our message replaces it."""

import json
import logging
import os
import sys
import time
import warnings

USER_ERROR_EXIT = 2

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that a kernel for its CPU-only weight layout
# is missing. modules.model keeps that layout off (same numbers on every CPU), so the line says
# nothing a user can or need act on. This leaf module is imported before bitsandbytes by every entry point.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Layers that keep their attention's outputs under checkpointing (modules.recompute) make torch warn, per
# compile, that in-place ops in the region would be unsafe: none writes to a kept output there, and tests
# compare those layers' gradients with eager ones.
logging.getLogger("torch._higher_order_ops.wrap").addFilter(
    lambda record: "context_fn is passed" not in record.getMessage()
)
# PEFT asks transformers 5.24 through a name it deprecated; printed on every run, for PEFT to change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class UserError(Exception):
    """A mistake in the user's config, data, flags or files: reported without a traceback, exit 2.

    The message says what is wrong, where (file, line, key, value) and how to fix it.
    """


def report_user_error(error: UserError) -> int:
    message = f"qlora-loop: error: {error}"
    print(message, file=sys.stderr, flush=True)
    _tell_the_launcher(message)
    return USER_ERROR_EXIT


def _tell_the_launcher(message: str) -> None:
    """Under a multi-process launch (torchrun, accelerate --multi_gpu), torch's launcher ends with a
    failure report whose "Root Cause" is read from this process's error file: put our message there,
    so the user's last screen says what to fix rather than "<N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    record = {
        "message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": str(int(time.time()))}}
    }
    try:
        with open(path, "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # the message is on stderr already


def quiet_progress_off_a_terminal() -> None:
    """transformers' weight-loading bars write one line per update when stderr is a file or a pipe."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
