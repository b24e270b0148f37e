"""Context-local switches of pyalign's internal code paths, for tests and benchmarks that compare
paths (``pyalign.overrides``). Normal use never needs them: every default is the automatic choice.

They are ``contextvars``: a ``with pyalign.overrides(...)`` block affects only the thread (or
asyncio task) that entered it, so concurrent callers do not see each other's switches. Autograd
may run a backward on another thread (CUDA): the ops capture the switches in effect at the
forward and restore them around their backward (:mod:`pyalign.ops._op`). Under ``torch.compile``
the switches in effect when a function is traced are part of its graph.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple, Optional

import torch


class Overrides(NamedTuple):
    """``forward_gradients``: reduced cross-entropies and frozen heads form their gradient in the
    forward (True, automatic) or always recompute the logits in the backward (False).
    ``backward_order``: the fused head's backward loop order, ``"token"`` (token chunks outermost)
    or ``"vocab"`` (vocabulary blocks outermost); None: by the weight's dtype. ``vocab_blocks``:
    ``(token_chunk, vocab_block)`` sizes of the vocab-blocked backward; None: automatic.
    ``gemm``: ``"auto"`` (oneDNN for CPU fp32 where it is faster) or ``"blas"`` (``torch.mm``
    everywhere)."""

    forward_gradients: bool = True
    backward_order: Optional[str] = None
    vocab_blocks: Optional[tuple] = None
    gemm: str = "auto"


_CURRENT: contextvars.ContextVar = contextvars.ContextVar("pyalign_overrides", default=Overrides())


def current() -> Overrides:
    """The switches in effect in this context."""
    return _CURRENT.get()


@torch.compiler.assume_constant_result
def forward_gradients() -> bool:
    """``current().forward_gradients``, readable while torch.compile traces a public function."""
    return _CURRENT.get().forward_gradients


def _check(changes: dict) -> None:
    fields = Overrides._fields
    for key, value in changes.items():
        if key not in fields:
            raise TypeError(f"overrides: unknown switch {key!r}; expected one of {', '.join(fields)}")
    if "forward_gradients" in changes and not isinstance(changes["forward_gradients"], bool):
        raise TypeError(f"forward_gradients: expected a bool, got {changes['forward_gradients']!r}")
    if changes.get("backward_order") not in (None, "token", "vocab"):
        raise ValueError(f"backward_order: expected None, 'token' or 'vocab', got {changes['backward_order']!r}")
    blocks = changes.get("vocab_blocks")
    if blocks is not None and not (isinstance(blocks, tuple) and len(blocks) == 2
                                   and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks)):
        raise ValueError(f"vocab_blocks: expected None or a pair of ints >= 1 (token_chunk, vocab_block), got {blocks!r}")
    if "gemm" in changes and changes["gemm"] not in ("auto", "blas"):
        raise ValueError(f"gemm: expected 'auto' or 'blas', got {changes['gemm']!r}")


@contextlib.contextmanager
def overrides(**changes):
    """Sets some of the :class:`Overrides` switches for the ``with`` block (this thread/task only)::

        with pyalign.overrides(forward_gradients=False, backward_order="vocab"):
            loss = pyalign.linear_cross_entropy(hidden, weight, labels)
    """
    _check(changes)
    token = _CURRENT.set(_CURRENT.get()._replace(**changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def restored(saved: Overrides):
    """Re-enters switches captured earlier (``current()`` at a forward) for a backward that may run on
    another thread."""
    token = _CURRENT.set(saved)
    try:
        yield
    finally:
        _CURRENT.reset(token)
