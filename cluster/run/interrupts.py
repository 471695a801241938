"""Knowing that the user pressed Ctrl-C during a Ray call that handles SIGINT itself.

Ray Train's ``fit()`` installs its own SIGINT handler, aborts the run gracefully and then leaves with an
error or ``SystemExit`` that says nothing of the interrupt (the process exited 1); Ray Tune stops the search
and returns. A wakeup fd records every signal whatever Python handler runs, so the command can end as an
interrupted one: exit 130, with what finished kept.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended a run that Ray stopped gracefully."""


@contextmanager
def watch_interrupts() -> Iterator[Callable[[], bool]]:
    """Yields a function that tells whether SIGINT arrived since entering; turns whatever Ray raises after a
    Ctrl-C into :class:`Interrupted`. Does nothing outside the main thread (Tune trials)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    seen = bytearray()
    open_fds = [read_fd]

    def interrupted() -> bool:  # also after the block: the signals read before the pipe closed are kept
        if open_fds:
            try:
                seen.extend(os.read(read_fd, 512))
            except BlockingIOError:
                pass
        return signal.SIGINT in seen

    try:
        try:
            yield interrupted
        except BaseException as exc:
            if interrupted() and not isinstance(exc, KeyboardInterrupt):
                raise Interrupted() from None
            raise
    finally:
        signal.set_wakeup_fd(previous)
        interrupted()
        open_fds.clear()
        os.close(read_fd)
        os.close(write_fd)
