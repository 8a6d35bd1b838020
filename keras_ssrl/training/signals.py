"""What a SIGTERM does to a pre-training run, stage by stage.

During training it asks for a checkpoint and a stop at the end of the current step;
once training is over (the encoder, projector and summary are being written) it is
only noted, and the run completes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable


class SigtermHandler:
    """What a SIGTERM does at each stage of a run.

    During training (`during_training` set by the training loop) it asks for a
    checkpoint and a stop at the end of the current step. Once training is over the
    encoder, the projector files and the summary are being written: stopping then
    would lose a finished run (and report it as interrupted), so the signal is only
    noted and the run completes. The handler only sets flags: it runs between two
    bytecodes of the main thread, possibly in the middle of a write.
    """

    def __init__(self):
        self.received = False
        self.during_training: Callable[[], None] | None = None

    def __call__(self) -> None:
        self.received = True
        if self.during_training is not None:
            self.during_training()


@contextlib.contextmanager
def on_sigterm(handler: Callable[[], None]):
    """Calls `handler` on SIGTERM while inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
