"""All-or-nothing changes of a model, also when interrupted.

A change of several steps (merging twenty weights, attaching hooks to forty modules) is done so
that an exception or a Ctrl-C leaves it whole or undone, never half-way: the steps record how to
undo themselves before they change anything, and :func:`finish` runs a list of steps (an undo, or
the rest of a restore) to the end whatever is raised meanwhile. In the main thread, Ctrl-C is also
held back for the length of such a change (:func:`deferred_interrupts`) and raised right after.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator

__all__ = ["deferred_interrupts", "finish"]


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block is done, then raise ``KeyboardInterrupt`` (main
    thread only; elsewhere, and where signals cannot be handled, the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except (ValueError, OSError):  # an embedding interpreter without signal handling
        yield
        return
    try:
        yield
    except BaseException:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        raise
    signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def finish(steps: Iterable[Callable[[], object]]) -> None:
    """Run every step, even when one raises (or a Ctrl-C arrives) meanwhile; then raise the first
    exception, if any. For undos and restores, which must not stop half-way."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except BaseException as exc:  # noqa: PERF203 (every step must run)
            first = first or exc
    if first is not None:
        raise first
