"""The one way a pyalign op is made: :func:`kernel_op` registers a function as the
``torch.library`` custom op ``pyalign::<name>`` (schema from its annotations, a fake kernel,
autograd), and gives it an eager fast path.

The custom op is what ``torch.compile(fullgraph=True)``, fake tensors, ``torch.export`` and
``opcheck`` see. It costs about 10 µs a call in the dispatcher (pytorch/pytorch#177109), which is as
much as a whole loss kernel for 64 pairs, so a plain eager call skips it: the same function runs
directly, inside a ``torch.autograd.Function`` built from the same ``setup_context`` and
``backward`` when a gradient is needed. Both paths run the same code and give bitwise the same
results. The op path is taken whenever something could be tracing: under ``torch.compile``, with a
``TorchDispatchMode`` active, or for tensor subclasses (fake, functional, DTensor).

Both paths capture :mod:`pyalign._overrides` at the forward and restore it around the backward.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor

from pyalign import _overrides


def _traced(args) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(isinstance(a, Tensor) and type(a) not in (Tensor, torch.nn.Parameter) for a in args)


def _requires_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


class KernelOp:
    """A pyalign op (see the module docstring). Call it with positional arguments."""

    def __init__(self, name: str, impl: Callable, mutates_args: Sequence[str]):
        self.name = f"pyalign::{name}"
        self.impl = impl
        self.op = torch.library.custom_op(self.name, impl, mutates_args=tuple(mutates_args))
        params = list(inspect.signature(impl).parameters.values())
        self._n = len(params)
        self._defaults = tuple(p.default for p in params if p.default is not inspect.Parameter.empty)
        self._function = None
        self.__doc__ = impl.__doc__

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as for
        ``torch.library.register_autograd``; used by both paths."""
        def setup(ctx, inputs, output):
            ctx.overrides = _overrides.current()
            setup_context(ctx, inputs, output)

        def backward_restored(ctx, *grads):
            with _overrides.restored(ctx.overrides):
                return backward(ctx, *grads)

        self.op.register_autograd(backward_restored, setup_context=setup)
        impl = self.impl

        def forward(ctx, *args):
            out = impl(*args)
            setup(ctx, args, out)
            return out

        # Built with type() so that its graph node is named after the op ("<name>Backward").
        self._function = type(self.name.split("::")[1], (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward_restored)})

    def __call__(self, *args):
        if len(args) < self._n:  # the schema's defaults, so that every path sees all inputs
            args = args + self._defaults[len(args) - self._n:]
        if _traced(args):
            return self.op(*args)
        if self._function is not None and _requires_grad(args):
            return self._function.apply(*args)
        return self.impl(*args)


def kernel_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``@kernel_op("token_logprobs")`` over the op's implementation."""
    return lambda impl: KernelOp(name, impl, mutates_args)
