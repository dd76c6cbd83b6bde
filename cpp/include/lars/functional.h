#pragma once

// The LARS maths, in one place: the C++ twin of torchlars/_functional.py.

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace lars {

/// What the trust ratio is computed from (SPEC.md, "Trust-ratio variants"); the names are
/// Python's strings, `trust_ratio="paper" | "decayed" | "update"`.
enum class TrustRatio {
  kPaper,   ///< "paper": tc * |w| / (|g| + wd * |w| + eps), then g <- (g + wd * w) * r
  kDecayed, ///< "decayed": tc * |w| / (|g + wd * w| + eps), then g <- (g + wd * w) * r
  kUpdate,  ///< "update" (LAMB, lars::LARS only): tc * |w| / (|u| + eps), u the base's own step / lr
};

/// The variant named `name` ("paper", "decayed" or "update"); any other name is refused,
/// naming `who` and the names that exist.
TrustRatio parse_trust_ratio(c10::string_view name, const char* who);

/// The Python spelling of `variant`.
const char* trust_ratio_name(TrustRatio variant);

/// Layer-wise trust ratios of LARS (You, Gitman & Ginsburg, 2017,
/// https://arxiv.org/abs/1708.03888), for each parameter w:
///
///     paper:   r = trust_coef * |w| / (n + weight_decay * |w| + eps),  n = |g|
///     decayed: r = trust_coef * |w| / (n + eps),                       n = |g + weight_decay * w|
///     update:  r = trust_coef * |w| / (n + eps),                       n = |w_after - w_before| / lr
///     r = 1                               unless |w| > 0 and n > 0 (the zero-norm rule)
///     r = min(r / lr, 1)                  only if clip (LARC)
///
/// where g is the gradient (already divided by the loss scale, and negated if maximising),
/// and for "update" w is the parameter before the base's step and w_after after it.
/// `param_norms` holds |w| and `norms` holds n, one per parameter. `lr` is a 0-dim tensor,
/// read only when `clip`. Pure tensor ops: nothing waits on the device. The other LARS
/// sources (lars.h, fused.h, the kernels) refer to this statement.
at::Tensor trust_ratio(
    const at::Tensor& param_norms,
    const at::Tensor& norms,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant = TrustRatio::kPaper);

/// The same ratio for one parameter, from its norms as numbers: the fused step's (fused.h).
double trust_ratio(
    double param_norm,
    double norm,
    double weight_decay,
    double lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant = TrustRatio::kPaper);

/// Replaces every gradient by its LARS-scaled version, in place:
///
///     g = (g + weight_decay * w) * r
///
/// with r from `trust_ratio` ("paper" or "decayed"; "update" scales no gradient and is
/// refused); `params[i]` and `grads[i]` belong together. Multi-tensor ATen ops per device
/// and dtype, norms accumulated in fp32 for half types, every kernel on the current stream
/// of the tensors' device, and no host synchronisation.
///
/// If `trust_ratios` is given (a 1-D fp32 tensor of params.size() ratios on the device of
/// every param), the ratios used are written into it: trust_ratios[i] is params[i]'s (the
/// telemetry of lars::LARS::trust_ratios; fp64 params' ratios rounded to fp32).
void lars_scale_gradients_(
    at::TensorList params,
    at::TensorList grads,
    double weight_decay,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant = TrustRatio::kPaper,
    const std::optional<at::Tensor>& trust_ratios = std::nullopt);

} // namespace lars
