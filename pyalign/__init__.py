"""pyalign: fused CPU/CUDA kernels for LLM alignment training."""
from pyalign._ext import _C
from pyalign import logprob  # first: pyalign.linear and pyalign.distributed build on it
from pyalign import distributed, losses, plasticity, uncertainty
from pyalign.logprob import (cross_entropy, linear_cross_entropy, linear_sequence_logprobs, linear_token_logprobs,
                             sequence_logprobs, token_logprobs)

__version__ = _C.__version__


def has_cuda() -> bool:
    """True when pyalign was compiled with its CUDA kernels."""
    return bool(_C.has_cuda())


def cuda_available() -> bool:
    """True when pyalign has CUDA kernels and a CUDA device is present."""
    return has_cuda() and _C.cuda_device_count() > 0


__all__ = [
    "__version__",
    "has_cuda",
    "cuda_available",
    "distributed",
    "logprob",
    "losses",
    "plasticity",
    "uncertainty",
    "token_logprobs",
    "sequence_logprobs",
    "linear_token_logprobs",
    "linear_sequence_logprobs",
    "cross_entropy",
    "linear_cross_entropy",
]
