"""A run's TensorBoard event files (`tb/`), written so that they can never stop training.

TensorBoard's writer (`torch.utils.tensorboard`) writes from a thread of its own; a write that
fails there (a full disk, a file-size limit) is raised by the next call. The first such error
turns logging to TensorBoard off with one warning: `metrics.jsonl` still holds every figure,
and the checkpoints are what must succeed or fail loudly.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises its error after keeping it for the next call; that
    call raises it again (and Board says it in one line), so the thread's own traceback on
    stderr would only repeat it. Other threads' errors print as before."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "semilla_board", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.semilla_board = True  # type: ignore[attr-defined]
    threading.excepthook = hook


class Board:
    """The methods of TensorBoard's SummaryWriter that a run uses; each call after a failed
    write does nothing."""

    def __init__(self, logdir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        quiet_writer_threads()
        self.logdir = logdir
        self.writer: Any = SummaryWriter(str(logdir), purge_step=purge_step)

    def _write(self, method: str, *args, **kwargs) -> None:
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args, **kwargs)
        except OSError as e:
            log.warning(
                "TensorBoard logging stopped: cannot write to %s (%s); training goes on", self.logdir, e
            )
            self.writer = None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write("add_scalar", tag, value, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._write("add_text", tag, text, step)

    def add_histogram(self, tag: str, values, step: int) -> None:
        self._write("add_histogram", tag, values, step)

    def add_embedding(self, table, metadata: list[str], step: int, tag: str) -> None:
        self._write("add_embedding", table, metadata=metadata, global_step=step, tag=tag)

    def close(self) -> None:
        self._write("close")
        self.writer = None
