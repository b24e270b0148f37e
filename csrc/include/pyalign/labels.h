// Class labels of the log-prob and uncertainty families (int32 or int64 tensors, any strides):
// reading one, and the error for one outside the vocabulary, on CPU and CUDA alike.
#pragma once
#include <string>
#include "pyalign/tensor.h"

namespace pyalign {

// The label at element offset `off` of labels (int32 or int64: the bindings check the dtype).
PYALIGN_HD int64_t read_label(const TensorArg& labels, int64_t off) {
  return labels.dtype == DType::i32 ? int64_t(labels.ptr<int32_t>()[off]) : labels.ptr<int64_t>()[off];
}

PYALIGN_HD bool label_in_vocab(int64_t label, int64_t V) { return label >= 0 && label < V; }

// The CPU kernels refuse a label outside [0, V) that is not ignore_index; the CUDA kernels cannot
// throw, and give its row NaN statistics and a zero gradient instead.
[[noreturn]] inline void bad_label(int64_t row, int64_t label, int64_t V, int64_t ignore_index) {
  fail("labels: value " + std::to_string(label) + " at flat position " + std::to_string(row) +
       " is outside [0, " + std::to_string(V) + ") and is not ignore_index (" +
       std::to_string(ignore_index) + ")");
}

}  // namespace pyalign
