// CPU kernels of the plasticity family (math in pyalign/plasticity.h): one pass over each weight
// row for a rule update (two with a norm constraint: the second re-reads the row from cache), one
// pass over a parameter for a consolidation penalty and its gradient.
#include "pyalign/plasticity.h"
#include "pyalign/cpu_dispatch.h"

#include <algorithm>

namespace pyalign {
namespace {

struct UpdCtx {
  PlasticArgs a;
  int64_t in;
};

template <typename T, bool HAS_G, bool HAS_E, bool HAS_G2>
PYALIGN_HD void update_row(const UpdCtx& c, int64_t i) {
  using A = typename acc_type<T>::type;
  const PlasticArgs& a = c.a;
  const PlasticCoeffs k = a.k;
  const int64_t n = c.in;
  T* w = a.w.ptr<T>() + i * a.w.strides[0];
  const A* g = HAS_G ? a.g.ptr<A>() + i * a.g.strides[0] : nullptr;
  A* e = HAS_E ? a.e.ptr<A>() + i * a.e.strides[0] : nullptr;
  const A* g2 = HAS_G2 ? a.g2.ptr<A>() + i * a.g2.strides[0] : nullptr;
  const A r = a.r.data ? a.r.ptr<A>()[i] : A(0);
  A scale = 1;
  if (k.norm_mode != 0) {
    A ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < n; ++j) {
      A en;
      A v = plastic_value<A>(k, to_float(w[j]), HAS_G ? g[j] : A(0), HAS_E ? e[j] : A(0), HAS_G2 ? g2[j] : A(0), r, &en);
      ss += v * v;
    }
    scale = norm_scale<A>(k.norm_mode, A(k.norm), ss);
  }
  const A lo = A(k.w_min), hi = A(k.w_max);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    A en;
    A v = plastic_value<A>(k, to_float(w[j]), HAS_G ? g[j] : A(0), HAS_E ? e[j] : A(0), HAS_G2 ? g2[j] : A(0), r, &en);
    if (HAS_E) e[j] = en;
    w[j] = to_storage<T, A>(clip_value<A>(v * scale, lo, hi));
  }
}
PYALIGN_CPU_CLONES(update_rows, update_row, UpdCtx, typename T COMMA bool HAS_G COMMA bool HAS_E COMMA bool HAS_G2,
                   T COMMA HAS_G COMMA HAS_E COMMA HAS_G2)

template <typename T> void update_typed(const UpdCtx& c, int64_t rows) {
  const bool hg = c.a.g.data != nullptr, he = c.a.e.data != nullptr, hg2 = c.a.g2.data != nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c.in, 1));
  parallel_rows(rows, grain, [&](int64_t b, int64_t e) {
    if (!hg) update_rows<T, false, false, false>(c, b, e);  // the bindings refuse e or g2 without g
    else if (he && hg2) update_rows<T, true, true, true>(c, b, e);
    else if (he) update_rows<T, true, true, false>(c, b, e);
    else if (hg2) update_rows<T, true, false, true>(c, b, e);
    else update_rows<T, true, false, false>(c, b, e);
  });
}

struct PenCtx {
  PenaltyArgs a;
  int64_t n;
};

template <typename T, bool GRAD> PYALIGN_HD void penalty_chunk(const PenCtx& c, int64_t ch) {
  using A = typename acc_type<T>::type;
  const PenaltyArgs& a = c.a;
  const int64_t b = ch * kPenaltyChunk, e = std::min(c.n, b + kPenaltyChunk);
  const T* p = a.p.ptr<T>();
  const T* anc = a.anchor.ptr<T>();
  const A* imp = a.imp.ptr<A>();
  T* grad = GRAD ? a.grad.ptr<T>() : nullptr;
  const A coef = A(a.coef);
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = b; j < e; ++j) {
    A gj;
    s += penalty_term<A>(to_float(p[j]), to_float(anc[j]), imp[j], coef, &gj);
    if (GRAD) grad[j] = to_storage<T, A>(A(to_float(grad[j])) + gj);
  }
  a.partial.ptr<A>()[ch] = s;
}
PYALIGN_CPU_CLONES(penalty_chunks, penalty_chunk, PenCtx, typename T COMMA bool GRAD, T COMMA GRAD)

template <typename T> void penalty_typed(const PenCtx& c) {
  const int64_t chunks = (c.n + kPenaltyChunk - 1) / kPenaltyChunk;
  const bool grad = c.a.grad.data != nullptr;
  parallel_rows(chunks, 4, [&](int64_t b, int64_t e) {
    if (grad) penalty_chunks<T, true>(c, b, e);
    else penalty_chunks<T, false>(c, b, e);
  });
}

}  // namespace

void plastic_update_cpu(const PlasticArgs& a) {
  UpdCtx c{a, a.w.shape[1]};
  const int64_t rows = a.w.shape[0];
  switch (a.w.dtype) {
    case DType::f32: update_typed<float>(c, rows); break;
    case DType::bf16: update_typed<bf16_t>(c, rows); break;
    case DType::f16: update_typed<f16_t>(c, rows); break;
    case DType::f64: update_typed<double>(c, rows); break;
    default: fail("weight: unsupported dtype " + std::string(dtype_name(a.w.dtype)));
  }
}

void quad_penalty_cpu(const PenaltyArgs& a) {
  PenCtx c{a, a.p.numel()};
  switch (a.p.dtype) {
    case DType::f32: penalty_typed<float>(c); break;
    case DType::bf16: penalty_typed<bf16_t>(c); break;
    case DType::f16: penalty_typed<f16_t>(c); break;
    case DType::f64: penalty_typed<double>(c); break;
    default: fail("param: unsupported dtype " + std::string(dtype_name(a.p.dtype)));
  }
}

}  // namespace pyalign
