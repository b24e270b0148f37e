// Bindings of the log-prob family: validation that the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/logprob.h"

namespace pyalign {
namespace {

// logits [..., V] (vocabulary stride 1) and labels of its leading shape.
void check_logits_labels(const TensorArg& logits, const TensorArg& labels) {
  require_tensor(logits, "logits", "a float tensor [..., V]");
  require_tensor(labels, "labels", "an int32 or int64 tensor of the leading shape of " + logits.describe());
  check_float(logits);
  require(logits.ndim >= 1, logits.describe() + ": expected at least 1 dimension [..., V]");
  require(logits.size(-1) >= 1, logits.describe() + ": expected a non-empty last (vocabulary) dimension");
  check_last_stride(logits, "vocabulary");
  require(labels.dtype == DType::i32 || labels.dtype == DType::i64, labels.describe() + ": expected dtype int32 or int64");
  bool same = labels.ndim == logits.ndim - 1;
  for (int d = 0; same && d < labels.ndim; ++d) same = labels.shape[d] == logits.shape[d];
  require(same, labels.describe() + ": expected shape " + dims_str(logits.shape, logits.ndim - 1) +
                    " (the leading shape of " + logits.describe() + ")");
}

// Optional class weights of mean_logit: [V] in the accumulation dtype, contiguous (on a vocabulary
// slice: the weights of the slice's V entries).
void check_mean_weights(const TensorArg& w, const TensorArg& logits) {
  if (!w.present()) return;
  const int64_t V = logits.size(-1);
  const DType adt = accumulation_dtype(logits.dtype);
  bool ok = w.ndim == 1 && w.shape[0] == V && is_contiguous(w);
  require(ok, w.describe() + ": expected " + contiguous_desc({V}, adt) + " (V of " + logits.describe() + ")");
  require(w.dtype == adt, w.describe() + ": expected dtype " + dtype_name(adt) + " (the accumulation dtype of " +
                              logits.describe() + ")");
}

LogitTransform make_transform(double temperature, double logit_scale, double softcap) {
  require(temperature > 0 && std::isfinite(temperature), "temperature: expected a finite value > 0, got " + num_str(temperature));
  require(std::isfinite(logit_scale) && logit_scale > 0, "logit_scale: expected a finite value > 0, got " + num_str(logit_scale));
  require(softcap >= 0 && std::isfinite(softcap),
          "softcap: expected a finite value > 0, or 0 for no softcapping, got " + num_str(softcap));
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
             double logit_scale, double softcap, int64_t ignore_index, uintptr_t stream,
             TensorArg mean_weights) {
  check_logits_labels(logits, labels);
  const int64_t rows = labels.numel();
  const DType adt = accumulation_dtype(logits.dtype);
  require_contiguous(logp, "logp", {rows}, adt);
  require_contiguous(lse, "lse", {rows}, adt);
  check_mean_weights(mean_weights, logits);
  for (const TensorArg* t : {&entropy, &log_sum_sq, &mean_logit}) check_contiguous(*t, {rows}, adt);
  check_contiguous(top1, {rows}, DType::b8);
  LogprobForwardArgs a{logits, labels, logp, lse, entropy, log_sum_sq, mean_logit, top1,
                       make_transform(temperature, logit_scale, softcap), ignore_index, SLICE, mean_weights};
  int dev = common_device({&logits, &labels, &logp, &lse, &entropy, &log_sum_sq, &mean_logit, &top1, &mean_weights});
  dispatch("token_logprobs", dev, [&] { logprob_forward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    logprob_forward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

template <bool SLICE>
void backward(TensorArg logits, TensorArg labels, TensorArg lse, TensorArg entropy, TensorArg grad_logp,
              TensorArg grad_entropy, TensorArg grad_logits, double temperature, double logit_scale,
              double softcap, int64_t ignore_index, uintptr_t stream, TensorArg grad_lse,
              TensorArg grad_mean, TensorArg mean_weights, int64_t mean_vocab) {
  check_logits_labels(logits, labels);
  const int64_t rows = labels.numel();
  const DType adt = accumulation_dtype(logits.dtype);
  require_contiguous(lse, "lse", {rows}, adt);
  for (const TensorArg* t : {&entropy, &grad_logp, &grad_entropy, &grad_lse, &grad_mean}) check_contiguous(*t, {rows}, adt);
  require(!grad_entropy.present() || entropy.present(),
          "entropy: expected the forward's entropy (" + contiguous_desc({rows}, adt) + ") with " + grad_entropy.describe() +
              ", got None");
  check_mean_weights(mean_weights, logits);
  const int64_t V = logits.size(-1);
  require(mean_vocab >= 0, "mean_vocab: expected 0 (the V of logits) or the vocabulary size, got " + std::to_string(mean_vocab));
  if (SLICE) {
    require(!grad_mean.present() || mean_vocab >= V,
            "mean_vocab: with grad_mean on a vocabulary slice, expected the whole vocabulary's size (>= " +
                std::to_string(V) + ", the V of " + logits.describe() + "), got " + std::to_string(mean_vocab));
  } else {
    require(mean_vocab == 0 || mean_vocab == V, "mean_vocab: expected 0 or " + std::to_string(V) + " (the V of " +
                                                    logits.describe() + ") off a vocabulary slice, got " +
                                                    std::to_string(mean_vocab));
  }
  require_tensor(grad_logits, "grad_logits", "an output tensor of the dtype and shape of " + logits.describe());
  check_like(grad_logits, logits);
  check_last_stride(grad_logits, "vocabulary");
  LogprobBackwardArgs a{logits, labels, lse, entropy, grad_logp, grad_entropy, grad_logits,
                        make_transform(temperature, logit_scale, softcap), ignore_index, SLICE,
                        grad_lse, grad_mean, mean_weights, mean_vocab};
  int dev = common_device({&logits, &labels, &lse, &entropy, &grad_logp, &grad_entropy, &grad_logits,
                           &grad_lse, &grad_mean, &mean_weights});
  dispatch("token_logprobs backward", dev, [&] { logprob_backward_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    logprob_backward_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_logprob(py::module_& m) {
  // Optional trailing arguments default to None (absent), so existing callers stay valid.
  const auto none = py::none();
#define PYALIGN_FWD_ARGS                                                                          \
  py::arg("logits"), py::arg("labels"), py::arg("logp"), py::arg("lse"), py::arg("entropy"),     \
      py::arg("log_sum_sq"), py::arg("mean_logit"), py::arg("top1"), py::arg("temperature"),     \
      py::arg("logit_scale"), py::arg("softcap"), py::arg("ignore_index"), py::arg("stream"),    \
      py::arg("mean_weights") = none
#define PYALIGN_BWD_ARGS                                                                          \
  py::arg("logits"), py::arg("labels"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"), \
      py::arg("grad_entropy"), py::arg("grad_logits"), py::arg("temperature"),                   \
      py::arg("logit_scale"), py::arg("softcap"), py::arg("ignore_index"), py::arg("stream"),    \
      py::arg("grad_lse") = none, py::arg("grad_mean") = none, py::arg("mean_weights") = none,   \
      py::arg("mean_vocab") = 0
  m.def("logprob_forward", &forward<false>, "Per-token log-probs and softmax statistics (writes the given outputs)",
        PYALIGN_FWD_ARGS);
  m.def("logprob_backward", &backward<false>,
        "Gradient of log-probs/entropy/lse/mean_logit w.r.t. logits (writes grad_logits)", PYALIGN_BWD_ARGS);
  // The same on a vocabulary slice: labels outside [0, V) (not ignore_index) lie in another slice.
  m.def("logprob_forward_slice", &forward<true>, "logprob_forward on a slice of the vocabulary", PYALIGN_FWD_ARGS);
  m.def("logprob_backward_slice", &backward<true>, "logprob_backward on a slice of the vocabulary", PYALIGN_BWD_ARGS);
#undef PYALIGN_FWD_ARGS
#undef PYALIGN_BWD_ARGS
}

}  // namespace pyalign
