"""Distillation: divergences between a student's and a teacher's next-token distributions, fused
(:mod:`.divergence`)."""
from pyalign.distill.divergence import REDUCTIONS, distillation_loss

__all__ = ["distillation_loss", "REDUCTIONS"]
