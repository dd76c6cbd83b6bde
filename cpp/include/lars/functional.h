#pragma once

// The LARS maths, in one place: the C++ twin of torchlars/_functional.py.

#include <ATen/core/Tensor.h>

namespace lars {

/// Layer-wise trust ratios of LARS (You, Gitman & Ginsburg, 2017,
/// https://arxiv.org/abs/1708.03888):
///
///     r = trust_coef * |w| / (|g| + weight_decay * |w| + eps)   if |w| > 0 and |g| > 0
///       = 1                                                      otherwise
///     r = min(r / lr, 1)                                         only if clip (LARC)
///
/// `param_norms` and `grad_norms` hold one norm per parameter. `lr` is a 0-dim tensor,
/// read only when `clip`. Pure tensor ops: nothing waits on the device.
at::Tensor trust_ratio(
    const at::Tensor& param_norms,
    const at::Tensor& grad_norms,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip);

/// The same ratio for one parameter, from its norms as numbers: the fused step's (fused.h).
double trust_ratio(
    double param_norm,
    double grad_norm,
    double weight_decay,
    double lr,
    double eps,
    double trust_coef,
    bool clip);

/// Replaces every gradient by its LARS-scaled version, in place:
///
///     g = (g + weight_decay * w) * r
///
/// with r from `trust_ratio`; `params[i]` and `grads[i]` belong together. Multi-tensor
/// ATen ops per device and dtype, norms accumulated in fp32 for half types, every kernel
/// on the current stream of the tensors' device, and no host synchronisation.
void lars_scale_gradients_(
    at::TensorList params,
    at::TensorList grads,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip);

} // namespace lars
