// CPU driver of the preference losses (math in pyalign/losses.h). Batches hold one value per
// sequence; the pre-pass and the aot sort run sequentially, the per-element phase in fixed
// blocks (threads for large batches). Deterministic whatever the thread count.
//
// fp32 calls of a paired family with one loss type (DPO's types except aot with the reverse-KL
// score, CPO/SimPO, ORPO, the reward model) run the element phase in tiles of kTile elements: the
// inputs converted into float tiles, then one loop over the tile with the family and type fixed at
// compile time, which vectorizes (ISA clones), and each sum in kLanes fixed lanes (the same bits
// on every ISA). A weighted sum of DPO types (MPO and the like, no aot) runs one such loop per type
// over the tile, adding its terms, then the common writes; KTO and BCO tile with their labels and
// the pre-pass's shift. Other calls (aot, other f-divergences, fp64) run process_element in
// element order.
#include "pyalign/losses.h"
#include "pyalign/cpu_dispatch.h"

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

namespace pyalign {
namespace {

// A float's place in sort_less's order as an unsigned key: the sign-flipped bits (negative
// numbers reversed), -0 as +0 (they tie), every NaN the largest key (NaN last).
inline uint32_t sort_key(float x) {
  if (x != x) return 0xffffffffu;
  const uint32_t u = float_to_bits(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The order sort_less defines (by value, NaN last, ties by index), as the element indices in
// sorted order. fp32: one sort of 64-bit (key, index) words, the index in the low bits breaking
// ties, with no comparator call per comparison; other types: the comparator.
template <typename A> void sorted_order(const std::vector<A>& vals, std::vector<int64_t>& idx) {
  const int64_t n = int64_t(vals.size());
  if constexpr (std::is_same<A, float>::value) {
    std::vector<uint64_t> keys(n);
    for (int64_t i = 0; i < n; ++i) keys[i] = (uint64_t(sort_key(vals[i])) << 32) | uint64_t(i);
    std::sort(keys.begin(), keys.end());
    for (int64_t r = 0; r < n; ++r) idx[r] = int64_t(keys[r] & 0xffffffffu);
  } else {
    std::iota(idx.begin(), idx.end(), int64_t(0));
    std::sort(idx.begin(), idx.end(), [&](int64_t i, int64_t j) { return sort_less(vals[i], i, vals[j], j); });
  }
}

// Ranks of the two sorted sequences of each aot loss, written to the workspace; the sequences
// are independent sorts, spread over threads for large batches.
template <typename A> void compute_ranks(const LossArgs& s) {
  const int64_t n = s.a.shape[0];
  const int count = aot_count(s.p);
  parallel_rows(2 * count, n >= 2048 ? 1 : 2 * count, [&](int64_t q0, int64_t q1) {
    std::vector<A> vals(n);
    std::vector<int64_t> idx(n);
    for (int64_t q = q0; q < q1; ++q) {
      const int k = int(q / 2), seq = int(q % 2);
      const int which = aot_which(s.p, k);
      for (int64_t i = 0; i < n; ++i) vals[i] = seq == 0 ? aot_x<A>(s, which, i) : aot_y<A>(s, which, i);
      sorted_order(vals, idx);
      int32_t* rank = s.work.ptr<int32_t>() + int64_t(k) * 4 * n + (seq == 0 ? 0 : 2 * n);
      int32_t* inv = rank + n;
      for (int64_t r = 0; r < n; ++r) { rank[idx[r]] = int32_t(r); inv[r] = int32_t(idx[r]); }
    }
  });
}

// Elements are processed in fixed blocks whose partial sums are added in block order, so the
// result does not depend on the number of threads; large batches spread the blocks over threads.
constexpr int64_t kBlock = 2048;
static_assert(kBlock % kTile == 0, "blocks hold whole tiles");
static_assert(int(DpoType::aot) == 9 && int(DpoType::aot_unpaired) == 10 && int(DpoType::sft) == 14,
              "tiled_fn lists the DPO types by number");

// `n` contiguous values from p into `out` (float): one vector loop per storage type.
template <class T>
PYALIGN_CPU_INLINE void copy_tile(const T* __restrict p, int n, float* __restrict out) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    if constexpr (std::is_same_v<T, bf16_t>) out[j] = to_float(p[j]);
    else out[j] = float(p[j]);  // bool gives 1 or 0
  }
}

// `n` values of t from element b into `out` (float), `dflt` for an absent input.
PYALIGN_CPU_INLINE void load_tile(const TensorArg& t, int64_t b, int n, float* __restrict out, float dflt) {
  if (!t.data) {
    for (int j = 0; j < n; ++j) out[j] = dflt;
    return;
  }
  if (t.ndim == 1 && t.strides[0] == 1) {
    switch (t.dtype) {
      case DType::f32: return copy_tile(t.ptr<float>() + b, n, out);
      case DType::bf16: return copy_tile(t.ptr<bf16_t>() + b, n, out);
      case DType::b8: return copy_tile(t.ptr<bool>() + b, n, out);
      case DType::i64: return copy_tile(t.ptr<int64_t>() + b, n, out);  // lengths as mask.sum(-1) counts them
      case DType::i32: return copy_tile(t.ptr<int32_t>() + b, n, out);
      default: break;
    }
  }
  for (int j = 0; j < n; ++j) out[j] = load<float>(t, b + j);
}

// The sums of a tiled block, in the order of their SumSlot: of a paired family, and of an
// unpaired one (KTO, BCO: rewards, log-probs and counts by label).
constexpr int kTiledSums = 9, kUnpairedSums = 7;
constexpr int kTiledSlot[kTiledSums] = {S_LOSS, S_RC, S_RR, S_ACC, S_LC, S_LR, S_X0, S_X1, S_X2};
constexpr int kUnpairedSlot[kUnpairedSums] = {S_LOSS, S_RC, S_RR, S_LC, S_LR, S_NC, S_NR};

struct TiledCtx {
  const LossArgs* s;
  float scale;
  float shift;     // KTO's KL estimate, BCO's reward mean (the pre-pass)
  float* partial;  // [blocks, kSums]
};

// kType of tiled_block for a DPO call with several loss types (none of them aot): the weighted
// sum of the types' losses and gradients, each type's math in its own loop over the tile.
constexpr int kMultiType = -2;

// One DPO loss type over a tile: its loss and gradients, times its weight, added into L, G0..G3.
// `one` is the call's arguments with this type as the only one (weight included).
template <int kType>
PYALIGN_CPU_INLINE void dpo_type_tile(const LossArgs& one, int m, const float* TA, const float* TB, const float* TC,
                                      const float* TD, const float* LA, const float* LB, float* __restrict L,
                                      float* __restrict G0, float* __restrict G1, float* __restrict G2,
                                      float* __restrict G3) {
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    Elem<float> e;
    e.a = TA[j]; e.b = TB[j]; e.c = TC[j]; e.d = TD[j];
    e.la = LA[j] > 1.0f ? LA[j] : 1.0f;  // load_len's clamp
    e.lb = LB[j] > 1.0f ? LB[j] : 1.0f;
    e.w = 1.0f;
    e.label = false;
    PairGrad<float> o;
    float cross[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    dpo_pair<float, kType, int(FDiv::reverse_kl)>(one, e, 0, o, cross);
    L[j] += o.loss; G0[j] += o.g[0]; G1[j] += o.g[1]; G2[j] += o.g[2]; G3[j] += o.g[3];
  }
}

// The DPO types a multi-type call may tile (every type but the aot pair), by number.
template <int... kTypes>
PYALIGN_CPU_INLINE void dpo_types_tile(int type, const LossArgs& one, int m, const float* TA, const float* TB,
                                       const float* TC, const float* TD, const float* LA, const float* LB, float* L,
                                       float* G0, float* G1, float* G2, float* G3, std::integer_sequence<int, kTypes...>) {
  ((type == kTypes ? (dpo_type_tile<kTypes>(one, m, TA, TB, TC, TD, LA, LB, L, G0, G1, G2, G3), 0) : 0), ...);
}
using TiledDpoTypes = std::integer_sequence<int, 0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14>;

// A tile of a multi-type DPO call: each type's loop adds its weighted terms, then one loop forms
// what the single-type loop of tiled_block writes (the same values as process_element).
PYALIGN_CPU_INLINE void multi_type_tile(const LossArgs& s, int m, const float* TA, const float* TB, const float* TC,
                                        const float* TD, const float* LA, const float* LB, const float* W,
                                        float scale, float* __restrict g0, float* __restrict g1,
                                        float* __restrict g2, float* __restrict g3, float* __restrict LU,
                                        float (&V)[kTiledSums][kTile]) {
  float G0[kTile] = {}, G1[kTile] = {}, G2[kTile] = {}, G3[kTile] = {};
  for (int j = 0; j < m; ++j) LU[j] = 0.0f;
  LossArgs one = s;
  one.p.n_types = 1;
  for (int t = 0; t < s.p.n_types; ++t) {
    one.p.types[0] = s.p.types[t];
    one.p.type_weights[0] = s.p.type_weights[t];
    dpo_types_tile(s.p.types[t], one, m, TA, TB, TC, TD, LA, LB, LU, G0, G1, G2, G3, TiledDpoTypes{});
  }
  const float beta = float(s.p.beta);
#pragma omp simd
  for (int j = 0; j < m; ++j) {
    const float w = W[j];
    g0[j] = scale * (w * G0[j]);
    g1[j] = scale * (w * G1[j]);
    g2[j] = scale * (w * G2[j]);
    g3[j] = scale * (w * G3[j]);
    V[0][j] = w * LU[j];
    const float rc = beta * (TA[j] - TC[j]), rr = beta * (TB[j] - TD[j]);
    V[1][j] = rc; V[2][j] = rr;
    V[3][j] = rc > rr ? 1.0f : 0.0f;
    V[4][j] = TA[j]; V[5][j] = TB[j];
    V[6][j] = 0.0f; V[7][j] = 0.0f; V[8][j] = 0.0f;
  }
}

// One block [blk * kBlock, ...) of a tiled configuration: process_element's math and writes.
template <int kFam, int kType, int kFDiv> PYALIGN_CPU_INLINE void tiled_block(const TiledCtx& c, int64_t blk) {
  const LossArgs& s = *c.s;
  const int64_t n = s.a.shape[0];
  const int64_t b0 = blk * kBlock, b1 = std::min(n, b0 + kBlock);
  const float scale = c.scale;
  const bool has_w = s.w.data != nullptr, per_elem = Reduction(s.p.reduction) == Reduction::none;
  float* g = s.grads.ptr<float>();
  int row[kLossGradInputs];
  for (int k = 0; k < kLossGradInputs; ++k) row[k] = grad_row(s.p.grad_rows, k);
  float spare[4][kTile];  // the element loops write every gradient; those the call does not form land here
  float lanes[kTiledSums][kLanes] = {};
  constexpr bool kUnpaired = kFam == int(LossFamily::kto) || kFam == int(LossFamily::bco);
  constexpr int kNumSums = kUnpaired ? kUnpairedSums : kTiledSums;
  const float shift = c.shift, beta = float(s.p.beta);
  float TA[kTile], TB[kTile], TC[kTile], TD[kTile], LA[kTile], LB[kTile], W[kTile], LBL[kTile];
  float V[kTiledSums][kTile], LU[kTile];
  for (int64_t b = b0; b < b1; b += kTile) {
    const int m = int(std::min<int64_t>(kTile, b1 - b));
    load_tile(s.a, b, m, TA, 0.0f);
    load_tile(s.b, b, m, TB, 0.0f);
    load_tile(s.c, b, m, TC, 0.0f);
    load_tile(s.d, b, m, TD, 0.0f);
    load_tile(s.la, b, m, LA, 1.0f);
    load_tile(s.lb, b, m, LB, 1.0f);
    load_tile(s.w, b, m, W, 1.0f);
    float* g0 = row[0] >= 0 ? g + row[0] * n + b : spare[0];
    float* g1 = row[1] >= 0 ? g + row[1] * n + b : spare[1];
    float* g2 = row[2] >= 0 ? g + row[2] * n + b : spare[2];
    float* g3 = row[3] >= 0 ? g + row[3] * n + b : spare[3];
    if constexpr (kUnpaired) {
      load_tile(s.label, b, m, LBL, 0.0f);
#pragma omp simd
      for (int j = 0; j < m; ++j) {
        Elem<float> e;
        e.a = TA[j]; e.b = 0.0f; e.c = TC[j]; e.d = 0.0f; e.la = 1.0f; e.lb = 1.0f;
        e.w = W[j];
        e.label = LBL[j] != 0.0f;
        PairGrad<float> o;
        unpaired_elem<float, kFam, kType>(s, e, shift, o);
        g0[j] = scale * (e.w * o.g[0]);
        g1[j] = scale * (e.w * o.g[1]);
        g2[j] = scale * (e.w * o.g[2]);
        g3[j] = scale * (e.w * o.g[3]);
        LU[j] = o.loss;
        V[0][j] = e.w * o.loss;
        const float reward = beta * (e.a - e.c);  // by label, as process_element sums them
        V[1][j] = e.label ? reward : 0.0f; V[2][j] = e.label ? 0.0f : reward;
        V[3][j] = e.label ? e.a : 0.0f; V[4][j] = e.label ? 0.0f : e.a;
        V[5][j] = e.label ? 1.0f : 0.0f; V[6][j] = e.label ? 0.0f : 1.0f;
      }
    } else if constexpr (kType == kMultiType) {
      multi_type_tile(s, m, TA, TB, TC, TD, LA, LB, W, scale, g0, g1, g2, g3, LU, V);
    } else {
#pragma omp simd
    for (int j = 0; j < m; ++j) {
      Elem<float> e;
      e.a = TA[j]; e.b = TB[j]; e.c = TC[j]; e.d = TD[j];
      e.la = LA[j] > 1.0f ? LA[j] : 1.0f;  // load_len's clamp
      e.lb = LB[j] > 1.0f ? LB[j] : 1.0f;
      e.w = W[j];
      e.label = false;
      const ElemOut<float> o = element_math<float, kFam, kType, kFDiv>(s, e, b + j, 0.0f);
      g0[j] = scale * (e.w * o.pg.g[0]);
      g1[j] = scale * (e.w * o.pg.g[1]);
      g2[j] = scale * (e.w * o.pg.g[2]);
      g3[j] = scale * (e.w * o.pg.g[3]);
      LU[j] = o.pg.loss;
      V[0][j] = e.w * o.pg.loss;
      V[1][j] = o.reward_c; V[2][j] = o.reward_r;
      V[3][j] = o.reward_c > o.reward_r ? 1.0f : 0.0f;
      V[4][j] = e.a; V[5][j] = e.b;
      V[6][j] = o.x0; V[7][j] = o.x1; V[8][j] = o.x2;
    }
    }
    // d loss / d weight (kept out of the loop above: a select on a bool stops it vectorizing)
    if (row[4] >= 0) {
      float* g4 = g + row[4] * n + b;
      if (has_w) {
#pragma omp simd
        for (int j = 0; j < m; ++j) g4[j] = scale * LU[j];
      } else {
        std::fill(g4, g4 + m, 0.0f);
      }
    }
    if (per_elem) std::copy(V[0], V[0] + m, s.loss.ptr<float>() + b);
    for (int k = 0; k < kNumSums; ++k) add_lanes(lanes[k], V[k], m);
  }
  float* part = c.partial + blk * kSums;
  for (int k = 0; k < kSums; ++k) part[k] = 0.0f;
  for (int k = 0; k < kNumSums; ++k) part[kUnpaired ? kUnpairedSlot[k] : kTiledSlot[k]] = lane_total(lanes[k]);
}

template <int kFam, int kType, int kFDiv> PYALIGN_CPU_INLINE void tiled_row(const TiledCtx& c, int64_t blk) {
  tiled_block<kFam, kType, kFDiv>(c, blk);
}
PYALIGN_CPU_CLONES(tiled_blocks, tiled_row, TiledCtx, int kFam COMMA int kType COMMA int kFDiv,
                   kFam COMMA kType COMMA kFDiv)

using BlocksFn = void (*)(const TiledCtx&, int64_t, int64_t);

template <int kFam, int... kTypes> BlocksFn pick(int type, std::integer_sequence<int, kTypes...>) {
  BlocksFn fn = nullptr;
  ((type == kTypes ? (fn = &tiled_blocks<kFam, kTypes, int(FDiv::reverse_kl)>, 0) : 0), ...);
  return fn;
}

// The tiled block function of a configuration, or nullptr where the element loop runs.
BlocksFn tiled_fn(const LossParams& p) {
  if (p.n_types > 1) {  // a weighted sum of DPO types: tiled unless an aot type couples elements
    if (LossFamily(p.family) != LossFamily::dpo || p.fdiv != int(FDiv::reverse_kl)) return nullptr;
    for (int t = 0; t < p.n_types; ++t)
      if (DpoType(p.types[t]) == DpoType::aot || DpoType(p.types[t]) == DpoType::aot_unpaired) return nullptr;
    return &tiled_blocks<int(LossFamily::dpo), kMultiType, int(FDiv::reverse_kl)>;
  }
  if (p.n_types != 1) return nullptr;
  const int t = p.types[0];
  switch (LossFamily(p.family)) {
    case LossFamily::dpo:  // every type but the aot pair (its ranks couple elements)
      if (p.fdiv != int(FDiv::reverse_kl)) return nullptr;
      return pick<int(LossFamily::dpo)>(t, TiledDpoTypes{});
    case LossFamily::cpo:
      return pick<int(LossFamily::cpo)>(t, std::make_integer_sequence<int, int(CpoType::simpo) + 1>{});
    case LossFamily::kto:
      return pick<int(LossFamily::kto)>(t, std::make_integer_sequence<int, int(KtoType::apo_zero_unpaired) + 1>{});
    case LossFamily::bco: return &tiled_blocks<int(LossFamily::bco), 0, 0>;
    case LossFamily::orpo: return &tiled_blocks<int(LossFamily::orpo), 0, 0>;
    case LossFamily::rm: return &tiled_blocks<int(LossFamily::rm), 0, 0>;
    default: return nullptr;
  }
}


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
  BlocksFn tiled = std::is_same<A, float>::value ? tiled_fn(s.p) : nullptr;
  if (tiled) {
    const TiledCtx ctx{&s, float(scale), float(shift), reinterpret_cast<float*>(partial.data())};
    parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) { tiled(ctx, b0, b1); });
  } else parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) {
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

// KL-DRO over blocks of kBlock pairs, in three passes of ISA-dispatched block functions: the
// blocks' minima; their fixed-lane sums of the terms (added in block order, so the bits depend on
// neither the thread count nor the ISA); the gradient columns.
template <typename A> struct KlDroCtx {
  A* l;
  A* g;
  int64_t n, rows;
  A tau, m, inv_norm;
  A* partial;  // [blocks]
};

template <typename A> PYALIGN_CPU_INLINE void kl_dro_min_row(const KlDroCtx<A>& c, int64_t blk) {
  const int64_t b = blk * kBlock, end = std::min(c.n, b + kBlock);
  A lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = c.l[b];
  int64_t i = b;
  for (; i + kLanes <= end; i += kLanes)
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) lanes[k] = nan_min(lanes[k], c.l[i + k]);
  A m = lanes[0];
  for (int k = 1; k < kLanes; ++k) m = nan_min(m, lanes[k]);
  for (; i < end; ++i) m = nan_min(m, c.l[i]);
  c.partial[blk] = m;
}

template <typename A> PYALIGN_CPU_INLINE void kl_dro_term_row(const KlDroCtx<A>& c, int64_t blk) {
  alignas(64) A values[kTile];
  A lanes[kLanes] = {0};
  const int64_t end = std::min(c.n, (blk + 1) * kBlock);
  for (int64_t i0 = blk * kBlock; i0 < end; i0 += kTile) {
    const int cnt = int(std::min<int64_t>(kTile, end - i0));
    A* li = c.l + i0;
#pragma omp simd
    for (int j = 0; j < cnt; ++j) li[j] = values[j] = kl_dro_term(li[j], c.m, c.tau);
    add_lanes(lanes, values, cnt);
  }
  c.partial[blk] = lane_total(lanes);
}

template <typename A> PYALIGN_CPU_INLINE void kl_dro_scale_row(const KlDroCtx<A>& c, int64_t blk) {
  const int64_t i0 = blk * kBlock, i1 = std::min(c.n, i0 + kBlock);
  const A* __restrict l = c.l;
  for (int64_t r = 0; r < c.rows; ++r) {
    A* __restrict gr = c.g + r * c.n;
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) gr[i] *= kl_dro_weight(l[i], c.inv_norm);
  }
}

PYALIGN_CPU_CLONES(kl_dro_min_blocks, kl_dro_min_row, KlDroCtx<A>, typename A, A)
PYALIGN_CPU_CLONES(kl_dro_term_blocks, kl_dro_term_row, KlDroCtx<A>, typename A, A)
PYALIGN_CPU_CLONES(kl_dro_scale_blocks, kl_dro_scale_row, KlDroCtx<A>, typename A, A)

template <typename A> void run_kl_dro(const KlDroArgs& s) {
  const int64_t n = s.loss.shape[0];
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<A> partial(static_cast<size_t>(nblocks));
  KlDroCtx<A> c{s.loss.ptr<A>(), s.grads.ptr<A>(), n, s.grads.shape[0], A(s.tau), A(0), A(0), partial.data()};
  parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) { kl_dro_min_blocks<A>(c, b0, b1); });
  c.m = partial[0];
  for (int64_t blk = 1; blk < nblocks; ++blk) c.m = nan_min(c.m, partial[blk]);
  parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) { kl_dro_term_blocks<A>(c, b0, b1); });
  A sum = A(0);
  for (int64_t blk = 0; blk < nblocks; ++blk) sum += partial[blk];
  c.inv_norm = kl_dro_inv_norm(sum, n);
  parallel_rows(nblocks, 2, [&](int64_t b0, int64_t b1) { kl_dro_scale_blocks<A>(c, b0, b1); });
  s.value.ptr<A>()[0] = kl_dro_value(c.m, sum, n, c.tau);
}

}  // namespace

void loss_forward_cpu(const LossArgs& s) {
  if (s.grads.dtype == DType::f64) run<double>(s);
  else run<float>(s);
}

void kl_dro_cpu(const KlDroArgs& s) {
  if (s.grads.dtype == DType::f64) run_kl_dro<double>(s);
  else run_kl_dro<float>(s);
}

}  // namespace pyalign
