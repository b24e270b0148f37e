"""Preference losses: the DPO family and its relatives, one fused kernel per call.

Every function takes per-sequence log-probs (as :func:`pyalign.sequence_logprobs` returns them,
summed over the completion's tokens) of the policy and, where the loss needs one, of a reference
model, and returns ``(loss, metrics)``:

- ``loss``: the reduced loss (``reduction="mean"`` or ``"sum"``, a 0-d tensor) or the per-element
  loss (``"none"``), in fp32 (fp64 for fp64 inputs) whatever the input dtype. Gradients flow to
  every log-prob input and to ``weights``.
- ``metrics``: a read-only mapping of detached 0-d tensors named as TRL logs them
  (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
  ``logps/chosen``, ``logps/rejected``, plus a few per loss). ``metrics.to_floats()`` gives
  Python floats with one device sync.

The kernel computes the loss, its gradient w.r.t. each input and the metrics in one pass over the
batch; the backward is a single multiply. ``weights`` (optional, per pair or per element) multiply
each element's loss before the reduction; ``"mean"`` divides the weighted sum by the number of
elements (as TRL does with its WPO weights), not by the sum of the weights. The pairwise losses
also take ``reduction="dro"``, the KL-DRO reduction of Dr. DPO (``dro_temperature``), and
:class:`GroupRobustWeights` reweights any per-example loss by group (GRPO's mirror ascent).
"""
from pyalign.losses.dpo import DPO_LOSS_TYPES, dpo_loss
from pyalign.losses.fused_linear import fused_linear_dpo_loss
from pyalign._metrics import Metrics
from pyalign.losses.reference_free import cpo_loss, orpo_loss, simpo_loss
from pyalign.losses.reward_model import reward_model_loss
from pyalign.losses.robust import GroupRobustWeights
from pyalign.losses.unpaired import BCORunningMean, bco_loss, kto_loss
from pyalign.ops.losses import F_DIVERGENCES

__all__ = ["Metrics", "dpo_loss", "kto_loss", "bco_loss", "BCORunningMean", "orpo_loss", "cpo_loss",
           "simpo_loss", "reward_model_loss", "fused_linear_dpo_loss", "GroupRobustWeights", "DPO_LOSS_TYPES",
           "F_DIVERGENCES"]
