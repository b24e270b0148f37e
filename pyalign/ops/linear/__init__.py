"""Fused linear head + log-probs: ``pyalign::linear_token_logprobs`` and its backward.

The logits ``hidden @ weight.T + bias`` are never held whole. Tokens are processed in chunks of
``chunk`` rows; each chunk's logits go into one reused ``[chunk, V]`` buffer (``torch.mm`` /
``torch.addmm``, i.e. the BLAS of the device; on CPU fp32 oneDNN's matmul, which returns a fresh
buffer per chunk: see :mod:`pyalign.ops.linear.gemm`), then through the log-prob kernels of
``csrc/cpu/logprob.cpp`` / ``csrc/cuda/logprob.cu``:

* forward: the softmax statistics of each row (``kernels.logprob_forward``); only per-token results
  survive the chunk;
* backward: the chunk's logits are recomputed, the gradient w.r.t. them is written **in place**
  into the same buffer (``kernels.logprob_backward`` with ``grad_logits`` aliasing the logits), and
  multiplied back: ``dhidden_chunk = g @ W``, ``dW += g.T @ hidden_chunk`` (accumulated in fp32,
  see :func:`pyalign.ops.linear.gemm.accumulate_dw`), ``dbias += g.sum(0)`` (fp32). The upstream gradients of the
  log-probs, the entropy, the log-sum-exp and ``mean_logit`` all enter that one kernel call, so
  a z-loss (``lse^2``) or label smoothing (``lse - mean_logit``) costs no extra pass.

The backward has two loop orders (same results within rounding, both deterministic: fixed order,
no atomics), chosen by :func:`pyalign.ops.linear.chunks.use_vocab_blocks`:

* token-outer (fp32/fp64 weights, or no weight gradient): as above, the chunk's logits over the
  whole vocabulary; ``dW`` accumulates in the result itself (fp32/fp64) or in an fp32 ``[V, H]``
  buffer;
* vocab-blocked (bf16/fp16 weights that need a gradient): vocabulary blocks outermost, token
  chunks inside (:func:`vocab_block_sizes`). For each (token chunk, vocab block) one GEMM makes the
  block's logits, the slice-mode kernel (``kernels.logprob_backward_slice``: the forward's global
  ``lse``/entropy, labels as block-local indices or -1 for "label in another block", ``mean_vocab``
  = V and the block's class weights for ``grad_mean``) writes the gradient in place, then
  ``dh[tok] += g @ W[vb]`` (fp32 ``dh`` accumulator for bf16/fp16) and ``dW[vb] += g.T @ h[tok]``.
  With all tokens in one chunk (the usual case) the block's ``dW`` is one GEMM written straight
  into the result; otherwise an fp32 ``[V_block, H]`` staging block is written once into ``dW``. No
  ``[V, H]`` fp32 accumulator exists.

Recomputing the logits in the backward costs one extra GEMM (4 instead of eager's 3). For
per-token outputs that is unavoidable: the upstream gradient is a per-token vector known only in
the backward, and ``dW = sum_t g_t (x) h_t`` cannot be rescaled per token after the sum. A
*reduced* cross-entropy ("mean"/"sum") is different: its per-token coefficients are known in the
forward up to the one scalar ``grad_output`` (the "mean" divisor comes from the labels, the
z-loss coefficient ``2 z lse_t / N`` from the chunk's own forward kernel), so
``pyalign::linear_cross_entropy_fwd_grad`` forms the gradient in the forward, 3 GEMMs per chunk
(:func:`pyalign.ops.linear.loops.chunked_forward_grad`), holds ``dh``/``dW``/``db`` until the backward and there only
multiplies them by ``grad_output`` (as Liger-Kernel does). Its separate z-loss output
(``return_z_loss``) has its own upstream gradient; when that is nonzero the backward adds its part
with the recompute loop (``pyalign::linear_cross_entropy_fwd_grad_backward``), so any combination
of the two is exact. Rows whose label is ``ignore_index`` are dropped before any GEMM.

The loops (:mod:`pyalign.ops.linear.loops`) also serve the vocab-parallel variant
(:mod:`pyalign.ops.vocab_parallel`), on a shard of the vocabulary (``vocab_slice=True``).

Modules: ``chunks`` (chunk sizes, loop order, row selection), ``gemm`` (the GEMMs and the probes of
what the device offers), ``loops`` (the chunk loops), ``ops`` (the op registrations).
"""
from pyalign.ops.linear.chunks import NEED_BIAS, NEED_HIDDEN, NEED_WEIGHT, auto_chunk_size
from pyalign.ops.linear.ops import (linear_cross_entropy_fwd_grad_op, linear_token_logprobs_basis_op,
                                    linear_token_logprobs_op)

__all__ = ["NEED_BIAS", "NEED_HIDDEN", "NEED_WEIGHT", "auto_chunk_size", "linear_cross_entropy_fwd_grad_op",
           "linear_token_logprobs_basis_op", "linear_token_logprobs_op"]
