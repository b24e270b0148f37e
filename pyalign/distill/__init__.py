"""Distillation: divergences between a student's and a teacher's next-token distributions, fused, from
logits (:mod:`.divergence`), from hidden states and LM heads (:mod:`.linear`), or to a sparse teacher
given as its top-k log-probs (:mod:`.topk`; from the student's hidden states: :mod:`.linear`)."""
from pyalign.distill.divergence import DIVERGENCES, REDUCTIONS, distillation_loss
from pyalign.distill.linear import linear_distillation_loss, linear_topk_distillation_loss
from pyalign.distill.topk import topk_distillation_loss
from pyalign.ops.distill_topk import DIVERGENCES as TOPK_DIVERGENCES, TAILS

__all__ = ["distillation_loss", "linear_distillation_loss", "topk_distillation_loss", "linear_topk_distillation_loss",
           "REDUCTIONS", "DIVERGENCES", "TOPK_DIVERGENCES", "TAILS"]
