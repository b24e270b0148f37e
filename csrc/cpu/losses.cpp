// CPU driver of the preference losses (math in pyalign/losses.h). Batches hold one value per
// sequence; the pre-pass and the aot sort run sequentially, the per-element phase in fixed
// blocks (threads for large batches). Deterministic whatever the thread count.
#include "pyalign/losses.h"
#include "pyalign/cpu_dispatch.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace pyalign {
namespace {

// Ranks of the two sorted sequences of the k-th aot loss, written to the workspace.
template <typename A> void compute_ranks(const LossArgs& s) {
  const int64_t n = s.a.shape[0];
  const int count = aot_count(s.p);
  std::vector<A> vals(n);
  std::vector<int64_t> idx(n);
  for (int k = 0; k < count; ++k) {
    const int which = aot_which(s.p, k);
    int32_t* base = s.work.ptr<int32_t>() + int64_t(k) * 4 * n;
    for (int seq = 0; seq < 2; ++seq) {
      for (int64_t i = 0; i < n; ++i) vals[i] = seq == 0 ? aot_x<A>(s, which, i) : aot_y<A>(s, which, i);
      std::iota(idx.begin(), idx.end(), int64_t(0));
      std::sort(idx.begin(), idx.end(), [&](int64_t i, int64_t j) { return sort_less(vals[i], i, vals[j], j); });
      int32_t* rank = base + (seq == 0 ? 0 : 2 * n);
      int32_t* inv = rank + n;
      for (int64_t r = 0; r < n; ++r) { rank[idx[r]] = int32_t(r); inv[r] = int32_t(idx[r]); }
    }
  }
}

// Elements are processed in fixed blocks whose partial sums are added in block order, so the
// result does not depend on the number of threads; large batches spread the blocks over threads.
constexpr int64_t kBlock = 2048;

template <typename A> void run(const LossArgs& s) {
  const int64_t n = s.a.shape[0];
  A pre = 0;
  const int64_t m = prepass_count<A>(s);
  for (int64_t i = 0; i < m; ++i) pre += prepass_term<A>(s, i);
  const A shift = prepass_shift<A>(s, pre);
  if (aot_count(s.p) > 0) compute_ranks<A>(s);
  const A scale = reduction_scale<A>(s);
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<A> partial(size_t(nblocks) * kSums, A(0));
  parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      // A local accumulator: the compiler can keep it in registers (a pointer into `partial`
      // might alias the gradient rows written for every element).
      A sums[kSums] = {0};
      const int64_t end = std::min(n, (blk + 1) * kBlock);
      for (int64_t i = blk * kBlock; i < end; ++i) process_element<A>(s, i, shift, scale, sums);
      std::copy(sums, sums + kSums, partial.data() + blk * kSums);
    }
  });
  A sums[kSums] = {0};
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int k = 0; k < kSums; ++k) sums[k] += partial[blk * kSums + k];
  finalize<A>(s, sums, shift);
}

}  // namespace

void loss_forward_cpu(const LossArgs& s) {
  if (s.grads.dtype == DType::f64) run<double>(s);
  else run<float>(s);
}

}  // namespace pyalign
