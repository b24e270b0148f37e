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


_PLAIN = (Tensor, torch.nn.Parameter)
_EAGER, _EAGER_GRAD, _TRACED = 0, 1, 2


def tracing() -> bool:
    """Whether something could be tracing this call: torch.compile or an active dispatch mode."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def hold_gradients(ctx, inputs, n_tensor_inputs: int, grads: tuple) -> None:
    """Keeps the gradients a forward formed for its backward (:func:`take_gradients`).

    Eager calls hand them over to the first backward, which may scale them in place and return them
    (no second buffer; autograd then makes them the leaves' ``.grad``), and save the tensor inputs
    ``inputs[:n_tensor_inputs]`` so that a second backward through a retained graph forms them again.
    Traced graphs (torch.compile, dispatch modes) save the gradients themselves, to be scaled out of
    place."""
    ctx.handoff = type(grads[0]) is Tensor and not tracing()
    if ctx.handoff:
        ctx.held = grads
        ctx.save_for_backward(*inputs[:n_tensor_inputs])
        ctx.options = inputs[n_tensor_inputs:]
    else:
        ctx.save_for_backward(*grads)


def take_gradients(ctx, recompute: Callable) -> tuple[tuple, bool]:
    """``(grads, owned)``: the gradients :func:`hold_gradients` kept, and whether this backward owns
    them (it may scale them in place and return them). A second backward of an eager call gets them
    from ``recompute(*tensor_inputs, *options)``."""
    if not ctx.handoff:
        return ctx.saved_tensors, False
    held, ctx.held = ctx.held, None
    if held is None:  # a second backward (retain_graph): the first one took the gradients
        held = recompute(*ctx.saved_tensors, *ctx.options)
    return held, True


def is_one(g: Tensor) -> bool:
    """Whether an incoming gradient is known to be the scalar 1 (``loss.backward()``) without a
    device sync: a CPU scalar is read (~1 µs); a GPU one is not, nor one that requires grad (the
    gradient must then stay a function of it)."""
    return g.device.type == "cpu" and g.dim() == 0 and not g.requires_grad and g.item() == 1.0


def scale_gradient(grad: Tensor, g: Tensor, owned: bool, one: bool, dtype: torch.dtype) -> Tensor:
    """``(grad * g).to(dtype)``: ``grad`` itself when ``g`` is 1 and the backward owns it, scaled in
    place when it owns it, else a new tensor (see :func:`take_gradients`)."""
    if not owned:
        grad = grad * g
    elif not one:
        grad = grad.mul_(g)
    return grad if grad.dtype == dtype else grad.to(dtype)


def _path(args, tensor_positions) -> int:
    """Which path a call takes: the custom op when something could be tracing (:func:`tracing`, or a
    tensor subclass), else the eager path, with autograd when an input needs it.
    One pass over the tensor arguments: this runs on every eager call."""
    if tracing():
        return _TRACED
    grad = False
    for i in tensor_positions:
        a = args[i]
        if a is not None:
            if type(a) not in _PLAIN:
                return _TRACED
            grad = grad or a.requires_grad
    return _EAGER_GRAD if grad and torch.is_grad_enabled() else _EAGER


def _tensor_positions(schema) -> tuple:
    """The positions of a schema's Tensor and optional Tensor arguments."""
    def is_tensor(t):
        if isinstance(t, torch._C.OptionalType):
            t = t.getElementType()
        return isinstance(t, torch._C.TensorType)
    return tuple(i for i, a in enumerate(schema.arguments) if is_tensor(a.type))


class KernelOp:
    """A pyalign op (see the module docstring). Call it with positional arguments."""

    def __init__(self, name: str, impl: Callable, mutates_args: Sequence[str]):
        self.name = f"pyalign::{name}"
        self.impl = impl
        self.op = torch.library.custom_op(self.name, impl, mutates_args=tuple(mutates_args))
        params = list(inspect.signature(impl).parameters.values())
        self._n = len(params)
        self._defaults = tuple(p.default for p in params if p.default is not inspect.Parameter.empty)
        self._tensor_positions = _tensor_positions(self.op._opoverload._schema)
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
            if ctx.overrides is _overrides.current():  # the usual case: nothing to restore
                return backward(ctx, *grads)
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
        path = _path(args, self._tensor_positions)
        if path == _TRACED:
            return self.op(*args)
        if path == _EAGER_GRAD and self._function is not None:
            return self._function.apply(*args)
        return self.impl(*args)


def kernel_op(name: str, *, mutates_args: Sequence[str] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``@kernel_op("token_logprobs")`` over the op's implementation."""
    return lambda impl: KernelOp(name, impl, mutates_args)


def ordered_params(values: dict, names: tuple, what: str) -> list[float]:
    """A kernel's scalar parameters as floats in the order of ``names`` (its contract), given by name;
    an unknown or a missing name is a TypeError naming ``what``."""
    if values.keys() != set(names):
        unknown, missing = sorted(set(values) - set(names)), [n for n in names if n not in values]
        raise TypeError(f"{what}: unknown {unknown}, missing {missing}; expected {', '.join(names)}")
    return [float(values[n]) for n in names]
