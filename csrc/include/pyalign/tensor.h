// The tensor descriptor that crosses from Python (pyalign/_ext.py) into the compiled core.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include "pyalign/common.h"

namespace pyalign {

constexpr int kMaxDims = 8;

struct TensorArg {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // in elements
  int device = -1;                  // -1: CPU, otherwise the CUDA device index
  char name[24] = {0};              // argument name for error messages ("": absent); a plain
                                    // array keeps the struct trivially copyable into CUDA kernels

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  bool present() const { return name[0] != 0; }  // optional arguments arrive as None
  std::string describe() const {
    std::string s = "'" + std::string(name) + "' (" + dtype_name(dtype) + ", shape [";
    for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
    return s + "])";
  }
  template <typename T> PYALIGN_HD T* ptr() const { return static_cast<T*>(data); }
};

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }
inline void require(bool ok, const std::string& msg) { if (!ok) fail(msg); }

// Offset (in elements) of "row" r of a tensor whose first `lead` dims are flattened into rows,
// for arbitrary strides: lets kernels read views (slices, the causal shift) without a copy.
struct RowIndexer {
  int lead = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};
  RowIndexer() = default;
  RowIndexer(const TensorArg& t, int lead_dims) : lead(lead_dims) {
    for (int d = 0; d < lead; ++d) { shape[d] = t.shape[d]; strides[d] = t.strides[d]; }
  }
  PYALIGN_HD int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int d = lead - 1; d >= 0; --d) {
      int64_t i = r % shape[d];
      r /= shape[d];
      off += i * strides[d];
    }
    return off;
  }
};

}  // namespace pyalign
