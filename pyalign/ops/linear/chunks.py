"""Chunk sizes of the fused linear head: tokens per chunk (the logits buffer's rows), the
(token chunk, vocabulary block) sizes of the vocab-blocked backward and the choice of loop order,
and the selection of the rows that need any work."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyalign import _overrides

# Bytes of the per-chunk working set (the logits buffer and the chunk's hidden-sized temporaries)
# when chunk_size is automatic. The GEMMs run at full speed from a few hundred rows on, so a
# larger buffer buys little time for a lot of memory.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
MIN_CHUNK = 16
# Rows from which a chunk's GEMMs are efficient (M of the logits/dhidden GEMMs, K of the dW GEMM):
# the automatic chunk is not made smaller than this for the hidden-size part of the budget.
GEMM_ROWS = {"cpu": 128, "cuda": 512}
# At most this many rows per automatic chunk: on the 2-core EPYC (32 MB L3) fp32 fwd+bwd at
# 8192 x 1024 x 32000 took 11.0 s with 256-row chunks (a 32 MB logits buffer, which the kernels
# and the two product GEMMs then find in cache), 11.3 s with 480 and 11.1 s with 192.
MAX_ROWS = {"cpu": 256}

NEED_HIDDEN, NEED_WEIGHT, NEED_BIAS = 1, 2, 4  # which gradients a backward forms

# Vocab-blocked backward: the smallest vocabulary block worth a GEMM (N of the logits GEMM, K of
# the dhidden GEMM, M of the dW GEMM) before the token chunk is split instead.
MIN_VOCAB_BLOCK = {"cpu": 1024, "cuda": 4096}


def auto_chunk_size(rows: int, vocab: int, dtype: torch.dtype, device: torch.device | str,
                    hidden: int = 0) -> int:
    """Rows per chunk, from V, the hidden size H, the dtype and the device.

    Each chunk row costs ``V * itemsize`` bytes of logits buffer plus ``H * (itemsize + 4)`` bytes
    of hidden-sized temporaries (the chunk's ``dhidden`` rows, an fp32 copy of the chunk's hidden
    rows for low-precision ``dW`` accumulation or mixed dtypes). The chunk is the number of such
    rows that fits ``CHUNK_BYTES[device]``, but never fewer than the logits buffer alone allows
    capped at ``GEMM_ROWS[device]`` (so a large H does not shrink the chunk below the size at which
    the GEMMs stay efficient), at most ``MAX_ROWS[device]`` (CPU: 256), rounded down to a multiple
    of 16, at least 16, at most ``rows``.
    The peak extra memory of the fused head beyond its gradients is then about
    ``chunk * V * itemsize`` + O(tokens * H) (an fp32 ``[tokens, H]`` ``dhidden`` accumulator for
    bf16/fp16 weights, which take the vocab-blocked backward; see pyalign.linear)."""
    dev = torch.device(device).type
    item = torch.empty((), dtype=dtype).element_size()
    budget = CHUNK_BYTES.get(dev, CHUNK_BYTES["cpu"])
    by_logits = budget // (max(1, vocab) * item)
    with_hidden = budget // (max(1, vocab) * item + max(0, hidden) * (item + 4))
    chunk = max(with_hidden, min(by_logits, GEMM_ROWS.get(dev, GEMM_ROWS["cpu"])))
    chunk = min(chunk, MAX_ROWS.get(dev, chunk))
    chunk = max(MIN_CHUNK, chunk // 16 * 16)
    return int(max(1, min(chunk, rows)))


def use_vocab_blocks(weight: Tensor, needs: int) -> bool:
    """The backward loop order: vocab-blocked when the weight gradient would otherwise need a
    separate fp32 ``[V, H]`` accumulator (bf16/fp16 weights that require grad), token-outer else
    (or as ``pyalign.overrides(backward_order=...)`` says)."""
    order = _overrides.current().backward_order
    if order is not None:
        return order == "vocab"
    return bool(needs & NEED_WEIGHT) and weight.dtype in (torch.bfloat16, torch.float16)


def vocab_block_sizes(rows: int, vocab: int, chunk: int, device: torch.device | str) -> tuple[int, int]:
    """``(token_chunk, vocab_block)`` of the vocab-blocked backward. The logits block gets the
    token-outer path's buffer, ``chunk * V`` elements. All rows go in one token chunk when that
    leaves a vocabulary block of at least ``MIN_VOCAB_BLOCK[device]`` (capped at V), the block then
    being as wide as the buffer allows, a multiple of 64; else the block is that minimum and the
    token chunk what fits (a multiple of 16, at least 16). ``pyalign.overrides(vocab_blocks=...)``
    sets both."""
    forced = _overrides.current().vocab_blocks
    if forced is not None:
        c, vb = forced
        return int(max(1, min(c, rows))), int(max(1, min(vb, vocab)))
    dev = torch.device(device).type
    rows, vocab, chunk = max(1, rows), max(1, vocab), max(1, chunk)
    elems = chunk * vocab
    floor = min(vocab, MIN_VOCAB_BLOCK.get(dev, MIN_VOCAB_BLOCK["cpu"]))
    if rows * floor <= elems:
        vb = min(vocab, elems // rows)
        if vb < vocab:
            vb = max(floor, vb // 64 * 64)
        return rows, int(vb)
    c = max(MIN_CHUNK, elems // floor // 16 * 16)
    return int(min(c, rows)), int(floor)


def valid_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """Indices of the rows to compute, or None when every row counts (no gather needed)."""
    keep = labels != ignore_index
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(1)


def scatter_rows(values: Tensor, idx: Optional[Tensor], n: int) -> Tensor:
    """Rows of ``values`` (computed for the valid rows only) placed at ``idx`` of ``n`` zeros."""
    if idx is None:
        return values
    out = values.new_zeros((n,) + tuple(values.shape[1:]))
    return out.index_copy_(0, idx, values)


def select_rows(t: Optional[Tensor], idx: Optional[Tensor]) -> Optional[Tensor]:
    if t is None or idx is None:
        return t
    return t.index_select(0, idx)
