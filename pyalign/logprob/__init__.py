"""Batched per-token log-probs and softmax statistics: from logits (:mod:`pyalign.logprob.logits`)
and from hidden states through the LM head without materializing the logits
(:mod:`pyalign.logprob.linear`). The vocab-parallel variants are in :mod:`pyalign.distributed`."""
from pyalign._checks import check_labels
from pyalign._outputs import TokenStats
from pyalign.logprob.linear import linear_cross_entropy, linear_sequence_logprobs, linear_token_logprobs
from pyalign.logprob.logits import cross_entropy, sequence_logprobs, token_logprobs

__all__ = ["token_logprobs", "sequence_logprobs", "cross_entropy", "check_labels", "TokenStats",
           "linear_token_logprobs", "linear_sequence_logprobs", "linear_cross_entropy"]
