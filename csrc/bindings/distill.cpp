// Bindings of the distillation divergences: validation the Python layer cannot bypass, then dispatch.
#include "pyalign/bind.h"
#include "pyalign/distill.h"

#include <cmath>
#include <iterator>
#include <utility>

namespace pyalign {
namespace {

void forward(TensorArg student, TensorArg teacher, TensorArg labels, TensorArg weight, TensorArg loss, TensorArg total,
             TensorArg grad_student, TensorArg grad_teacher, const std::string& divergence, double beta,
             double temperature, double student_softcap,
             double teacher_softcap, int64_t ignore_index, uintptr_t stream) {
  require_tensor(student, "student_logits", "a float tensor [N, V]");
  require_tensor(teacher, "teacher_logits", "a float tensor [N, V]");
  check_float(student);
  require(student.ndim == 2, student.describe() + ": expected a 2-d tensor [N, V] (rows of logits)");
  check_last_stride(student, "vocabulary");
  check_last_stride(teacher, "vocabulary");
  require(teacher.ndim == 2 && teacher.shape[0] == student.shape[0] && teacher.shape[1] == student.shape[1],
          teacher.describe() + ": expected the shape of " + student.describe() + " (one vocabulary for both)");
  require(teacher.dtype == student.dtype, teacher.describe() + ": expected dtype " + dtype_name(student.dtype) +
                                              " (the dtype of " + student.describe() + ")");
  const int64_t N = student.shape[0], V = student.shape[1];
  require(V >= 1, student.describe() + ": expected a vocabulary of at least one entry");
  if (labels.present())
    require(labels.ndim == 1 && labels.shape[0] == N && (labels.dtype == DType::i64 || labels.dtype == DType::i32),
            labels.describe() + ": expected an int32 or int64 tensor [" + std::to_string(N) + "] (one label per row)");
  require(std::isfinite(beta) && beta >= 0 && beta <= 1, "beta: expected a value in [0, 1], got " + num_str(beta));
  int named = -1;
  for (int k = 0; k < int(std::size(kDivModeNames)); ++k)
    if (divergence == kDivModeNames[k]) named = k;
  require(named >= 0 && DivMode(named) != DivMode::forward_kl && DivMode(named) != DivMode::reverse_kl,
          "divergence: expected 'jsd' (forward / reverse KL at beta 0 / 1), 'tvd', 'skew_kl' or 'skew_reverse_kl', "
          "got '" + divergence + "'");
  require(std::isfinite(temperature) && temperature > 0,
          "temperature: expected a finite value > 0, got " + num_str(temperature));
  require(std::isfinite(student_softcap) && student_softcap >= 0,
          "student_softcap: expected a finite value > 0 (0: none), got " + num_str(student_softcap));
  require(std::isfinite(teacher_softcap) && teacher_softcap >= 0,
          "teacher_softcap: expected a finite value > 0 (0: none), got " + num_str(teacher_softcap));
  const DType adt = accumulation_dtype(student.dtype);
  require_contiguous(weight, "weight", {N}, adt);
  require_contiguous(loss, "loss", {N}, adt);
  require_contiguous(total, "total", {}, adt);
  require_contiguous(grad_student, "grad_student", {N, V}, adt);
  check_contiguous(grad_teacher, {N, V}, adt);
  DistillParams p;
  // the JSD is the forward / reverse KL at its ends; beta is the mixture weight of the others
  p.mode = DivMode(named) != DivMode::jsd ? named
                                          : int(beta == 0 ? DivMode::forward_kl : beta == 1 ? DivMode::reverse_kl : DivMode::jsd);
  p.beta = beta;
  for (auto [tf, cap] : {std::pair<LogitTransform*, double>{&p.ts, student_softcap}, {&p.tt, teacher_softcap}}) {
    tf->inv_temp = 1.0 / temperature;
    tf->scale_over_temp = 1.0 / temperature;
    tf->softcap = cap;
  }
  p.ignore_index = ignore_index;
  const DistillArgs a{student, teacher, labels, weight, loss, total, grad_student, grad_teacher, p};
  const int dev = common_device({&student, &teacher, &labels, &weight, &loss, &total, &grad_student, &grad_teacher});
  dispatch("distillation loss", dev, [&] { distill_cpu(a); }, [&] {
#ifdef PYALIGN_WITH_CUDA
    distill_cuda(a, reinterpret_cast<void*>(stream));
#endif
  });
}

}  // namespace

void bind_distill(py::module_& m) {
  m.def("distill_forward", &forward,
        "Generalized JSD (forward / reverse KL at beta 0 / 1) of rows of student and teacher logits: per-row "
        "divergences, their weighted total, and the weighted gradients (writes the outputs)");
}

}  // namespace pyalign
