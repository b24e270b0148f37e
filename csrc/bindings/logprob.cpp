// Bindings of the log-prob family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/logprob.h"

namespace pyalign {
namespace {

bool is_float(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16 || d == DType::f64; }
DType acc_dtype(DType d) { return d == DType::f64 ? DType::f64 : DType::f32; }

void check_rows(const TensorArg& t, int64_t rows, DType dt) {
  if (!t.present()) return;
  require(t.ndim == 1 && t.shape[0] == rows && (rows <= 1 || t.strides[0] == 1),
          t.describe() + ": expected a contiguous 1-d tensor of " + std::to_string(rows) + " elements");
  require(t.dtype == dt, t.describe() + ": expected dtype " + dtype_name(dt));
}

void check_logits_labels(const TensorArg& logits, const TensorArg& labels) {
  require(is_float(logits.dtype), logits.describe() + ": expected float32, float16, bfloat16 or float64");
  require(logits.ndim >= 1, logits.describe() + ": expected at least 1 dimension [..., V]");
  require(logits.size(-1) >= 1, logits.describe() + ": the vocabulary dimension is empty");
  require(logits.stride(-1) == 1 || logits.size(-1) == 1, logits.describe() + ": the vocabulary dimension must have stride 1");
  require(labels.dtype == DType::i32 || labels.dtype == DType::i64, labels.describe() + ": expected int32 or int64");
  require(labels.ndim == logits.ndim - 1, labels.describe() + ": expected the leading shape of " + logits.describe());
  for (int d = 0; d < labels.ndim; ++d)
    require(labels.shape[d] == logits.shape[d], labels.describe() + ": expected the leading shape of " + logits.describe());
}

LogitTransform make_transform(double temperature, double logit_scale, double softcap) {
  require(temperature > 0 && std::isfinite(temperature), "temperature: expected a finite value > 0, got " + std::to_string(temperature));
  require(std::isfinite(logit_scale) && logit_scale > 0, "logit_scale: expected a finite value > 0, got " + std::to_string(logit_scale));
  require(softcap >= 0 && std::isfinite(softcap), "softcap: expected a finite value > 0 (or None), got " + std::to_string(softcap));
  LogitTransform tf;
  tf.inv_temp = 1.0 / temperature;
  tf.scale = logit_scale;
  tf.scale_over_temp = logit_scale / temperature;
  tf.softcap = softcap;
  return tf;
}

template <bool SLICE>
void forward(TensorArg logits, TensorArg labels, TensorArg logp, TensorArg lse, TensorArg entropy,
             TensorArg log_sum_sq, TensorArg mean_logit, TensorArg top1, double temperature,
             double logit_scale, double softcap, int64_t ignore_index, uintptr_t stream) {
  check_logits_labels(logits, labels);
  const int64_t rows = labels.numel();
  const DType adt = acc_dtype(logits.dtype);
  require(logp.present() && lse.present(), "logp and lse outputs are required");
  for (const TensorArg* t : {&logp, &lse, &entropy, &log_sum_sq, &mean_logit}) check_rows(*t, rows, adt);
  check_rows(top1, rows, DType::b8);
  LogprobForwardArgs a{logits, labels, logp, lse, entropy, log_sum_sq, mean_logit, top1,
                       make_transform(temperature, logit_scale, softcap), ignore_index, SLICE};
  int dev = common_device({&logits, &labels, &logp, &lse, &entropy, &log_sum_sq, &mean_logit, &top1});
  dispatch("token_logprobs", dev, [&] { logprob_forward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    logprob_forward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

template <bool SLICE>
void backward(TensorArg logits, TensorArg labels, TensorArg lse, TensorArg entropy, TensorArg grad_logp,
              TensorArg grad_entropy, TensorArg grad_logits, double temperature, double logit_scale,
              double softcap, int64_t ignore_index, uintptr_t stream) {
  check_logits_labels(logits, labels);
  const int64_t rows = labels.numel();
  const DType adt = acc_dtype(logits.dtype);
  for (const TensorArg* t : {&lse, &entropy, &grad_logp, &grad_entropy}) check_rows(*t, rows, adt);
  require(lse.present(), "lse is required");
  require(!grad_entropy.present() || entropy.present(), "entropy is required with grad_entropy");
  require(grad_logits.dtype == logits.dtype && grad_logits.ndim == logits.ndim, grad_logits.describe() + ": expected the dtype and shape of " + logits.describe());
  for (int d = 0; d < logits.ndim; ++d)
    require(grad_logits.shape[d] == logits.shape[d], grad_logits.describe() + ": expected the shape of " + logits.describe());
  require(grad_logits.stride(-1) == 1 || logits.size(-1) == 1, grad_logits.describe() + ": the vocabulary dimension must have stride 1");
  LogprobBackwardArgs a{logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits,
                        make_transform(temperature, logit_scale, softcap), ignore_index, SLICE};
  int dev = common_device({&logits, &labels, &lse, &entropy, &grad_logp, &grad_entropy, &grad_logits});
  dispatch("token_logprobs backward", dev, [&] { logprob_backward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    logprob_backward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_logprob(py::module_& m) {
  m.def("logprob_forward", &forward<false>, "Per-token log-probs and softmax statistics (writes the given outputs)");
  m.def("logprob_backward", &backward<false>, "Gradient of log-probs/entropy w.r.t. logits (writes grad_logits)");
  // The same on a vocabulary slice: labels outside [0, V) (not ignore_index) lie in another slice.
  m.def("logprob_forward_slice", &forward<true>, "logprob_forward on a slice of the vocabulary");
  m.def("logprob_backward_slice", &backward<true>, "logprob_backward on a slice of the vocabulary");
}

}  // namespace pyalign
