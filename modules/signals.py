"""SIGTERM and SIGINT: a first signal ends the run cleanly, a second one at once."""

import os
import signal
import sys


class StopSignal:
    """During the loop: finish the current optimizer step, checkpoint, exit. After the last step the
    final adapter is already being saved, so a signal lets that finish (it is the run's result).
    A second signal exits at once; every write is atomic, so that loses only the write in flight."""

    def __init__(self):
        self.signum: int | None = None
        self.training = True
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        doing = (
            "finishing this step, then writing a checkpoint"
            if self.training
            else "training is done; finishing the final save"
        )
        print(f"\n{signal.Signals(signum).name}: {doing} (signal again to exit now).", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """True on every process once any process got a signal (one tiny all-reduce per step)."""
        import torch

        flag = torch.tensor(float(self.signum or 0), device=accelerator.device)
        received = int(accelerator.reduce(flag, "max").item())
        self.signum = self.signum or (received or None)
        return received > 0

    @staticmethod
    def restore() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
