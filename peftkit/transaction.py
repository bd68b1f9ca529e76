"""All-or-nothing changes of a model, also when interrupted.

A change of several steps (merging twenty weights, attaching hooks to forty modules) is done so
that an exception or a Ctrl-C leaves it whole or undone, never half-way: the steps record how to
undo themselves before they change anything, and :func:`finish` runs a list of steps (an undo, or
the rest of a restore) to the end whatever is raised meanwhile. In the main thread, Ctrl-C is also
held back for the length of such a change (:func:`deferred_interrupts`) and raised right after.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import torch

__all__ = ["Journal", "deferred_interrupts", "finish"]


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


class Journal:
    """The one undo mechanism for changes to a backbone: each change is recorded with its undo before
    it is made, and :meth:`undo` reverts them all, newest first, to the end whatever is raised.

    Used for the tensors an adapter substitutes during one forward call, for a merge (weights
    changed in place, ``train`` copies and fresh heads put in, tied tensors, layer sizes), and for
    anything else that must be undone exactly: an undo puts back the original objects and values,
    never a recomputed inverse.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def put(self, store: MutableMapping[str, Any], key: str, value: Any) -> None:
        """Set ``store[key] = value`` (a module's ``_parameters`` or ``_buffers``), keeping the old one."""
        self._undo.append(functools.partial(store.__setitem__, key, store[key]))
        store[key] = value

    def set_attribute(self, obj: object, name: str, value: Any) -> None:
        """Set ``obj.name = value``, keeping the old value."""
        self._undo.append(functools.partial(setattr, obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def keep(self, tensor: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Back up ``tensor``'s values (only its flat entries at ``index`` when given) before the
        caller changes it in place; the undo copies them back."""
        with torch.no_grad():
            if index is None:
                self._undo.append(functools.partial(_copy_back, tensor, tensor.detach().clone()))
            else:
                self._undo.append(functools.partial(_copy_entries_back, tensor, index, tensor.detach().reshape(-1)[index].clone()))

    def undo(self) -> None:
        """Revert every recorded change, newest first (all of them, even if one raises; the first
        exception is raised at the end). The journal is empty afterwards."""
        steps, self._undo = self._undo[::-1], []
        finish(steps)

    def forget(self) -> None:
        """Drop the recorded undos (the changes become permanent, e.g. after ``unwrap(merge=True)``)."""
        self._undo.clear()


def _copy_back(tensor: torch.Tensor, original: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.copy_(original)


def _copy_entries_back(tensor: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.view(-1).index_copy_(0, index, values)
