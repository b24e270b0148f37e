"""Argument checks shared by the public API: each error names the argument and what was expected."""
from __future__ import annotations

import math

import torch

from pyalign._ext import FLOAT_DTYPES, check_cuda_supported


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str, *, allow_fp64: bool = True) -> torch.Tensor:
    tensor(x, name)
    ok = FLOAT_DTYPES if allow_fp64 else FLOAT_DTYPES[:3]
    if x.dtype not in ok:
        raise TypeError(f"{name}: expected a floating tensor ({', '.join(str(d) for d in ok)}), got {x.dtype}")
    check_cuda_supported(x, name)
    return x


def index_tensor(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {x.dtype}")
    return x


def same_device(*named: tuple[str, torch.Tensor | None]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    for n, t in present[1:]:
        if t.device != present[0][1].device:
            raise ValueError(f"{n}: expected a tensor on {present[0][1].device} like {present[0][0]}, got {t.device}")


def positive(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {x!r}")
    return float(x)


def finite(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")
    return float(x)


def choice(x, name: str, options) -> str:
    if x not in options:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, options))}, got {x!r}")
    return x


def _elements_disjoint(shape, stride) -> bool:
    """True when no two indices of a strided view address the same element: sorted by stride, each
    dimension must step past everything the smaller-strided dimensions can reach (transposes and
    slices pass; expanded and overlapping as_strided views do not)."""
    reach = 0
    for st, n in sorted((st, n) for st, n in zip(stride, shape) if n > 1):
        if st <= reach:
            return False
        reach += (n - 1) * st
    return True


def writable(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuses a tensor to be written in place whose elements share memory (expanded/overlapping views)."""
    if torch.compiler.is_compiling():  # symbolic strides: only the zero-stride case is decidable
        overlap = any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape))
    else:
        overlap = not _elements_disjoint(x.shape, x.stride())
    if overlap:
        raise ValueError(f"{name}: is written in place, so its elements must not overlap in memory "
                         f"(got shape {tuple(x.shape)} with strides {tuple(x.stride())}; pass a .clone() or "
                         ".contiguous() tensor)")
    return x


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = -100) -> None:
    """Raises ValueError if a label is outside ``[0, vocab_size)`` and is not ``ignore_index``.

    On CUDA this synchronizes with the host; the kernels themselves never read out of bounds and
    return NaN for such a label, so the check is opt-in there (``validate=True``).
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise ValueError(f"labels: value {int(labels.flatten()[idx])} at flat position {idx} is outside "
                         f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")


def integer(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected an int, got {x!r}")
    return x


def logit_options(ignore_index, temperature, logit_scale, softcap) -> tuple[float, float, float]:
    """Checks the options every log-prob function shares; returns ``(temperature, logit_scale,
    softcap)`` as floats (softcap 0.0 for none)."""
    integer(ignore_index, "ignore_index")
    temperature = positive(temperature, "temperature")
    logit_scale = positive(logit_scale, "logit_scale")
    softcap = 0.0 if softcap is None else positive(softcap, "softcap")
    return temperature, logit_scale, softcap


def chunk_size(x, name: str = "chunk_size"):
    if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
        raise ValueError(f"{name}: expected None or an int >= 1, got {x!r}")
    return x


def head(hidden, weight, bias, labels, *, shift: bool, weight_name: str = "weight",
         bias_name: str = "bias", hidden_name: str = "hidden") -> None:
    """Shape/dtype/device checks of an LM head ``hidden [..., H]``, ``weight [V, H]``, ``bias [V]``
    and ``labels`` of ``hidden``'s leading shape. fp32/bf16/fp16 tensors may differ in dtype (the
    GEMMs run in the promoted or autocast dtype); fp64 must not be mixed with other dtypes."""
    float_tensor(hidden, hidden_name)
    float_tensor(weight, weight_name)
    index_tensor(labels, "labels")
    if bias is not None:
        float_tensor(bias, bias_name)
    same_device((hidden_name, hidden), (weight_name, weight), (bias_name, bias), ("labels", labels))
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{hidden_name}: expected shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"{weight_name}: expected shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name}: expected shape [V, {hidden.shape[-1]}] (H of {hidden_name}), "
                         f"got {tuple(weight.shape)}")
    for t, name in ((weight, weight_name), (bias, bias_name)):
        if t is not None and t.dtype != hidden.dtype and torch.float64 in (t.dtype, hidden.dtype):
            raise TypeError(f"{name}: expected dtype {hidden.dtype} like {hidden_name} (fp64 cannot be mixed with "
                            f"other dtypes), got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name}: expected shape [{weight.shape[0]}] (V of {weight_name}), "
                         f"got {tuple(bias.shape)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (the leading shape of {hidden_name}), "
                         f"got {tuple(labels.shape)}")
    if shift and hidden.dim() < 2:
        raise ValueError(f"shift=True: {hidden_name} needs a sequence dimension [..., T, H], got {tuple(hidden.shape)}")


def cross_entropy_options(reduction, label_smoothing, z_loss_scale, class_weights, vocab_size, like,
                       like_name="logits"):
    """Validates the cross-entropy options; returns ``(label_smoothing, z_loss_scale, weights)``
    with the class weights as a detached contiguous ``[V]`` tensor in the accumulation dtype."""
    choice(reduction, "reduction", ("mean", "sum", "none"))
    eps = finite(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    zs = finite(z_loss_scale, "z_loss_scale")
    if zs < 0:
        raise ValueError(f"z_loss_scale: expected a finite number >= 0, got {z_loss_scale!r}")
    w = None
    if class_weights is not None:
        float_tensor(class_weights, "class_weights")
        if tuple(class_weights.shape) != (vocab_size,):
            raise ValueError(f"class_weights: expected shape [{vocab_size}] (one weight per class), "
                             f"got {tuple(class_weights.shape)}")
        same_device((like_name, like), ("class_weights", class_weights))
        w = class_weights.detach().to(torch.float64 if like.dtype == torch.float64 else torch.float32).contiguous()
    return eps, zs, w


def per_token_only(kwargs: dict, fn: str, per_token_fn: str) -> None:
    """Refuses the per-token statistics options in a per-sequence function."""
    if kwargs.get("return_entropy") or kwargs.get("outputs") is not None:
        raise ValueError(f"{fn}: return_entropy / outputs are per-token statistics, not supported here; "
                         f"use {per_token_fn}")


def probabilities(probs: torch.Tensor, name: str) -> None:
    if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(f"{name}: expected probabilities in [0, 1] (got values outside, or NaN)")
