#pragma once

// The fused LARS + momentum-SGD step of liblars: one CPU kernel that scales, decays and
// applies the gradients of a param group. Registered as torch.ops.torchlars.lars_sgd_
// (ops.cpp); lars::LARS steps with it around torch::optim::SGD.

#include <lars/functional.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace lars {

/// Whether the fused kernel steps tensors of `dtype`: fp32, fp64, bf16 and fp16.
bool fused_dtype(at::ScalarType dtype);

/// One LARS + momentum-SGD step of a param group, for CPU tensors of one dtype. For each i,
/// with w = params[i], g = grads[i] / grad_scale (negated if maximize), buf = momentum_buffers[i]:
///
///     r   = trust_ratio(|w|, n, weight_decay, lr, eps, trust_coef, clip, variant)
///     d   = (g + weight_decay * w) * r
///     buf = d if is_first_step else momentum * buf + (1 - dampening) * d    (if momentum != 0)
///     d   = d + momentum * buf if nesterov else buf                          (if momentum != 0)
///     w   = w - lr * d
///
/// with n = |g| for TrustRatio::kPaper and |g + weight_decay * w| for kDecayed (functional.h;
/// kUpdate is refused), which is LARS followed by torch::optim::SGD's step, in two passes over
/// memory: one reads w and g for the norms, the other reads w, g and buf and writes w and buf.
/// The passes go block by block (about 1 MB), so that the second finds in cache what the first
/// read. The norms are summed in an order fixed by the tensors' sizes, so the step gives the
/// same bits on any number of threads. Half types do the arithmetic in fp32.
/// `momentum_buffers` may be empty when momentum is 0. If `found_inf` is non-zero, nothing is
/// modified. `grads` are read only. If `trust_ratios` is given (a 1-D fp32 CPU tensor of
/// params.size()), the step writes the ratio r of every parameter into it (telemetry; left as
/// it is when `found_inf` skips).
void lars_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const at::Tensor& lr,
    double weight_decay,
    double momentum,
    double dampening,
    bool nesterov,
    bool maximize,
    bool is_first_step,
    double eps,
    double trust_coef,
    bool clip,
    const std::optional<at::Tensor>& grad_scale = std::nullopt,
    const std::optional<at::Tensor>& found_inf = std::nullopt,
    TrustRatio variant = TrustRatio::kPaper,
    const std::optional<at::Tensor>& trust_ratios = std::nullopt);

} // namespace lars
