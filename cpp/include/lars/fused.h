#pragma once

// The fused LARS + momentum-SGD step of liblars: one CPU kernel that scales, decays and
// applies the gradients of a param group while it carries the parameter norms over to the
// next step. Registered as torch.ops.torchlars.lars_sgd_ and torch.ops.torchlars.lars_param_norms
// (ops.cpp); lars::LARS steps with it around torch::optim::SGD.

#include <lars/functional.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace lars {

/// The L2 norm of every tensor, as one fp32 tensor [tensors.size()] (also for fp64 tensors,
/// whose squares are summed in fp64; half-type squares are summed in fp32).
///
/// Deterministic: the order of summation depends only on each tensor's size, never on the
/// number of threads, so the result is bit for bit the norm that `lars_sgd_` leaves in
/// `param_norms` for the same values. CPU tensors of one dtype.
at::Tensor lars_param_norms(at::TensorList tensors);

/// One LARS + momentum-SGD step of a param group, for CPU tensors of one dtype. For each i,
/// with w = params[i], g = grads[i] / grad_scale (negated if maximize), buf = momentum_buffers[i]:
///
///     r   = trust_ratio(param_norms[i], n, weight_decay, lr, eps, trust_coef, clip, variant)
///     d   = (g + weight_decay * w) * r
///     buf = d if is_first_step else momentum * buf + (1 - dampening) * d    (if momentum != 0)
///     d   = d + momentum * buf if nesterov else buf                          (if momentum != 0)
///     w   = w - lr * d
///     param_norms[i] = |w|, of the values stored
///
/// with n = |g| for TrustRatio::kPaper and |g + weight_decay * w| for kDecayed (functional.h;
/// kUpdate is refused), which is LARS followed by torch::optim::SGD's step, in two passes over
/// memory: one reads g (and w for kDecayed) for n, the other reads w, g and buf and writes w
/// and buf.
/// `param_norms` must hold |w| on entry (as `lars_param_norms` computes it), unless
/// `recompute_param_norms`: then it is only written, and the first pass reads w as well, for
/// |w|, bit for bit what `lars_param_norms` gives. The passes go block by block (about 1 MB),
/// so that the second finds in cache what the first read. The caller recomputes whenever
/// something else may have written w since the last step. Half types do the arithmetic in
/// fp32. `momentum_buffers` may be empty when momentum is 0. If `found_inf` is non-zero,
/// nothing is modified but `param_norms`, which still ends as |w|. `grads` are read only.
/// If `trust_ratios` is given (a 1-D fp32 CPU tensor of params.size()), the step writes the
/// ratio r of every parameter into it (telemetry; left as it is when `found_inf` skips).
void lars_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const at::Tensor& param_norms,
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
    bool recompute_param_norms = false,
    TrustRatio variant = TrustRatio::kPaper,
    const std::optional<at::Tensor>& trust_ratios = std::nullopt);

} // namespace lars
