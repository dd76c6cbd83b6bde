#pragma once

// liblars's fused CPU steps: LARS + momentum SGD, and LAMB, each one operator that reads and
// writes every tensor of a param group in two passes (norms, then the update). Registered as
// torch.ops.torchlars.lars_sgd_ and torch.ops.torchlars.lamb_ (ops.cpp); lars::LARS (around
// torch::optim::SGD), lars::LARSSGD and lars::LAMB step with them.

#include <lars/lamb.h>
#include <lars/lars_sgd.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace lars {

/// Whether the fused kernels step tensors of `dtype`: fp32, fp64, bf16 and fp16.
bool fused_dtype(at::ScalarType dtype);

/// One LARS + momentum-SGD step of a param group, for CPU tensors of one dtype, with the
/// settings of `options` (LARSSGDOptions; `lars_exclude` is not read). For each i, with
/// w = params[i], g = grads[i] / grad_scale (negated if maximize), buf = momentum_buffers[i],
/// and r the trust ratio of lars::trust_ratio (functional.h), "paper" or "decayed":
///
///     d   = (g + weight_decay * w) * r
///     buf = d if is_first_step else momentum * buf + (1 - dampening) * d    (if momentum != 0)
///     d   = d + momentum * buf if nesterov else buf                          (if momentum != 0)
///     w   = w - lr * d
///
/// which is LARS followed by torch::optim::SGD's step, in two passes over memory: one reads w
/// and g for the norms, the other reads w, g and buf and writes w and buf. The passes go block
/// by block (about 1 MB), so that the second finds in cache what the first read. The norms are
/// summed in an order fixed by the tensors' sizes, so the step gives the same bits on any
/// number of threads. Half types do the arithmetic in fp32, fp64 tensors in fp64 (norms and
/// ratios included). `momentum_buffers` may be empty when momentum is 0. If `found_inf` is
/// non-zero, nothing is modified. `grads` are read only. If `trust_ratios` is given (a 1-D CPU
/// tensor of params.size(), fp32, or fp64 for fp64 params), the step writes the ratio r of
/// every parameter into it (telemetry; left as it is when `found_inf` skips).
void lars_sgd_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList momentum_buffers,
    const LARSSGDOptions& options,
    bool is_first_step,
    const std::optional<at::Tensor>& grad_scale = std::nullopt,
    const std::optional<at::Tensor>& found_inf = std::nullopt,
    const std::optional<at::Tensor>& trust_ratios = std::nullopt);

/// One LAMB step of a param group (You et al., 2019, https://arxiv.org/abs/1904.00962, as
/// timm's Lamb and apex's FusedLAMB compute it), for CPU tensors of one dtype, with the
/// settings of `options` (LAMBOptions: lr, betas, eps, weight_decay, trust_coef, trust_eps,
/// trust_clip, bias_correction, maximize; `always_adapt`, `max_grad_norm` and `lars_exclude`
/// are the caller's, folded into `adapt` and `grad_scale`). For each i, with w = params[i],
/// g = grads[i] / grad_scale (negated if maximize), m = exp_avgs[i], v = exp_avg_sqs[i] and
/// t = state_steps[i] (a one-element CPU tensor: the step number, already counted, as
/// torch's fused AdamW takes it):
///
///     m = beta1 * m + (1 - beta1) * g          v = beta2 * v + (1 - beta2) * g^2
///     u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + weight_decay * w
///     r = lars::trust_ratio(|w|, |u|, 0, lr, trust_eps, trust_coef, false, kUpdate)
///     r = min(r, 1) if trust_clip;  r = 1 unless adapt
///     w = w - lr * r * u
///
/// with bc1 = 1 - beta1^t and bc2 = 1 - beta2^t (1 without bias_correction). Two passes: the
/// first updates m and v and sums |w|^2 and |u|^2, the second writes w; block by block, norms
/// in an order fixed by the sizes, half types in fp32, fp64 in fp64, as lars_sgd_. In fp32 and
/// fp64 the first pass writes u over g and the second reads it back, as apex's FusedLAMB does:
/// after an adapted step, grads[i] holds u (unless it shares memory with another tensor of the
/// call, or is laid out unlike params[i]). Half types make u again from m and v instead; a step
/// that is not adapted is AdamW's, in one pass, and leaves grads as they were. If `found_inf`
/// is non-zero, nothing is modified. Returns the ratios r,
/// a 1-D CPU tensor of params.size() (fp64 for fp64 params, else fp32); NaN where
/// `found_inf` skipped the step.
at::Tensor lamb_(
    at::TensorList params,
    at::TensorList grads,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList state_steps,
    const LAMBOptions& options,
    bool adapt,
    const std::optional<at::Tensor>& grad_scale = std::nullopt,
    const std::optional<at::Tensor>& found_inf = std::nullopt);

} // namespace lars
