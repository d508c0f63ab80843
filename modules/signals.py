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
        self.agreed = False  # every process has learnt of a signal (several processes)
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

    def flag(self, accelerator):
        """Under several processes, this process's signal reduced over all of them (the highest), a
        tensor the loop reads a step later (`agree`), so that every process stops at the same step
        without the host waiting on the GPU. None for one process, which reads its own at once."""
        import torch

        if accelerator.num_processes == 1:
            return None
        return accelerator.reduce(torch.full((), float(self.signum or 0), device=accelerator.device), "max")

    def agree(self, received: float) -> None:
        """Take in a reduced flag (see `flag`): a signal any process got."""
        if received > 0:
            self.signum = self.signum or int(received)
            self.agreed = True

    def requested(self, accelerator) -> bool:
        """True once every process knows of a signal: at once for one process, a step after it came
        for several."""
        return self.signum is not None if accelerator.num_processes == 1 else self.agreed

    @staticmethod
    def restore() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
