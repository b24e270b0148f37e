"""pyalign: fused CPU/CUDA kernels for LLM alignment training."""
from pyalign._ext import _C
from pyalign import logprob
from pyalign import plasticity
from pyalign.logprob import sequence_logprobs, token_logprobs

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
    "logprob",
    "plasticity",
    "token_logprobs",
    "sequence_logprobs",
]
