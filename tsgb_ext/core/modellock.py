"""One TSGB conversion of a model at a time.

TSGB converts a model in place (instance ``forward`` attributes, parameters'
``requires_grad``, training and ``inplace`` flags) and restores it on exit. Two conversions of
one model that overlap (two threads calling ``attribute``, or ``with`` blocks exited out of
order) save each other's patched state as the "original" and leave the model converted for
good. So every conversion holds the model's :class:`ModelLock`:

* a call outside a ``with`` block holds it for the call; a ``with TSGB(model) as ex:`` block
  holds it from ``__enter__`` to ``__exit__`` (its own calls, from any thread, run inside it,
  one at a time);
* another thread asking for the model waits until the holder is done;
* the thread that holds the model and asks for a second, overlapping conversion (another
  explainer's call or ``with`` block on the same model) gets a ``RuntimeError`` at once: it
  would otherwise wait for itself, or convert the model twice.

Locks are kept per model object (weakly: a model that is garbage collected drops its lock).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator, Optional

import torch.nn as nn

_locks: "weakref.WeakKeyDictionary[nn.Module, ModelLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


class ModelLock:
    """The lock of one model's conversion: held by one owner (an explainer's ``with`` block or
    one call) at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.owner: Optional[object] = None
        self.thread: Optional[int] = None   # the thread that took it

    def acquire(self, owner: object, what: str = "this conversion") -> None:
        """Take the model for ``owner``; wait while another thread holds it. Raises
        RuntimeError when this thread already holds it (for another owner, or ``owner``)."""
        me = threading.get_ident()
        with self._cond:
            while self.owner is not None:
                if self.owner is owner:
                    raise RuntimeError("this TSGB explainer is already active in a with-block")
                if self.thread == me:
                    raise RuntimeError(
                        f"the model is already converted for TSGB in this thread (an open "
                        f"`with TSGB(model)` block, or a call in progress); {what} would "
                        f"convert it a second time and could not restore it. Use the "
                        f"explainer of that with-block, or exit the block first")
                self._cond.wait()
            self.owner, self.thread = owner, me

    def release(self, owner: object) -> None:
        """Give the model back (a no-op unless ``owner`` holds it)."""
        with self._cond:
            if self.owner is owner:
                self.owner = self.thread = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, owner: object, what: str = "this conversion") -> Iterator[None]:
        self.acquire(owner, what)
        try:
            yield
        finally:
            self.release(owner)


def model_lock(model: nn.Module) -> ModelLock:
    """The :class:`ModelLock` of ``model`` (made on first use)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = ModelLock()
        return lock
