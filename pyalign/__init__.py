"""pyalign: fused CPU/CUDA kernels for LLM alignment training."""
from pyalign import distill, distributed, logprob, losses, plasticity, rl, uncertainty
from pyalign._ext import HAS_CUDA, kernels
from pyalign._overrides import overrides
from pyalign._version import __version__
from pyalign.logprob import (cross_entropy, linear_cross_entropy, linear_sequence_logprobs, linear_token_logprobs,
                             sequence_logprobs, token_logprobs)


def has_cuda() -> bool:
    """True when pyalign was compiled with its CUDA kernels."""
    return HAS_CUDA


def cuda_available() -> bool:
    """True when pyalign has CUDA kernels and a CUDA device is present."""
    return HAS_CUDA and kernels.cuda_device_count() > 0


def cpu_isa() -> str:
    """The instruction set the CPU kernels dispatch to: "baseline", "avx2" or "avx512" (the best the
    CPU supports, or the lower level named by the environment variable PYALIGN_CPU_ISA)."""
    return kernels.cpu_isa()


__all__ = [
    "__version__",
    "has_cuda",
    "cuda_available",
    "cpu_isa",
    "overrides",
    "distill",
    "distributed",
    "logprob",
    "losses",
    "plasticity",
    "rl",
    "uncertainty",
    "token_logprobs",
    "sequence_logprobs",
    "linear_token_logprobs",
    "linear_sequence_logprobs",
    "cross_entropy",
    "linear_cross_entropy",
]
