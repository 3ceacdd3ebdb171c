"""Stopping a run cleanly: SIGTERM (Slurm ``scancel``, a preemption, a container stop), SIGUSR1
(Slurm's ``--signal=USR1@N`` warning before the time limit) and Ctrl-C end training at the next
step boundary with a checkpoint of that exact point.

The signal handler only records the signal; the training loop asks :meth:`StopFlag.requested`
at every step boundary (and between evaluation batches). Under DDP the answer is all-reduced,
so every rank stops at the same step and rank 0 writes the one checkpoint. A second signal
stops at once (:class:`StopNow`): the last complete checkpoint stays the resume point.

The flag belongs to one training run: :func:`resdense.train.runner.train` installs it and puts
the previous handlers back when it returns.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def signal_name(signum: int) -> str:
    return {signal.SIGINT: "Ctrl-C (SIGINT)"}.get(signum, signal.Signals(signum).name)


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on a signal. A ``KeyboardInterrupt``, so that code catching ``Exception``
    (a study moving on to its next run) does not swallow it; the command line prints the message
    and exits with ``exit_code`` (128 + the signal's number, as a shell reports it)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.message, self.signum = message, signum
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:
        # Pickled across processes (a study's --jobs workers): rebuild from both arguments.
        return type(self), (self.message, self.signum)


class StopNow(TrainingStopped):
    """A second signal: stop at once, without a new checkpoint."""


class StopFlag:
    """The stop request of one training run. Use as a context manager around the run: it installs
    handlers for SIGINT, SIGTERM and SIGUSR1 (in the main thread only; elsewhere signals cannot be caught
    and the flag stays down) and restores the previous ones on exit."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None   # the first signal received by this process
        self._agreed: Optional[int] = None  # the signal every rank agreed on (DDP), once stopping
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # The user insists: stop where we are. Raising here unwinds through the writers' cleanup
        # (temporary files are removed; `last` still points at a complete checkpoint).
        self.__exit__()
        raise StopNow(f"stopped at once by a second {signal_name(signum)}", signum)

    def requested(self) -> bool:
        """Whether to stop at this step boundary. Under torch.distributed every rank must call it
        at the same boundaries: the flags are all-reduced (any rank's signal stops them all)."""
        if self._agreed is not None:
            return True
        local = self.signum or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
            flag = torch.tensor([local], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        if local:
            self._agreed = local
        return bool(local)

    def signalled(self) -> bool:
        """Whether this process received a signal (no all-reduce: for work rank 0 does alone)."""
        return self.signum is not None

    @property
    def stopping(self) -> Optional[int]:
        """The signal this run is stopping for, once :meth:`requested` said so."""
        return self._agreed

    def stopped(self, run_dir: Path, where: str, checkpoint: Optional[Path]) -> TrainingStopped:
        """The exception ending a run stopped at ``where`` after writing ``checkpoint``."""
        signum = self._agreed or self.signum or signal.SIGINT
        saved = f"checkpoint {checkpoint} written" if checkpoint else f"{run_dir}/last is up to date"
        return TrainingStopped(f"stopped by {signal_name(signum)} {where}; {saved}; continue with "
                               f"the same command plus --resume (resdense train --out {run_dir} --resume ...)", signum)

