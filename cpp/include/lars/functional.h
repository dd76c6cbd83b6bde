#pragma once

// The LARS maths, in one place: the C++ twin of torchlars/_functional.py.

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <utility>
#include <vector>

namespace lars {

/// What the trust ratio is computed from (`trust_ratio` below; SPEC.md, "Trust-ratio variants"); the names are
/// Python's strings, `trust_ratio="paper" | "decayed" | "update"`.
enum class TrustRatio {
  kPaper,   ///< "paper": the LARS paper's ratio, from |g|
  kDecayed, ///< "decayed": from |g + wd * w|
  kUpdate,  ///< "update" (LAMB, lars::LARS only): from the base's step per unit of learning rate
};

/// The variant named `name` ("paper", "decayed" or "update"); any other name is refused,
/// naming `who` and the names that exist.
TrustRatio parse_trust_ratio(c10::string_view name, const char* who);

/// The Python spelling of `variant`.
const char* trust_ratio_name(TrustRatio variant);

/// Layer-wise trust ratios of LARS (You, Gitman & Ginsburg, 2017,
/// https://arxiv.org/abs/1708.03888): the formula of liblars, stated here once. For each
/// parameter w:
///
///     paper:   r = trust_coef * |w| / (n + weight_decay * |w| + eps),  n = |g|
///     decayed: r = trust_coef * |w| / (n + eps),                       n = |g + weight_decay * w|
///     update:  r = trust_coef * |w| / (n + eps),                       n = |u|
///     r = 1                               unless |w| > 0 and n > 0 (the zero-norm rule)
///     r = min(r / lr, 1)                  only if clip (LARC)
///
/// where g is the gradient (already divided by the loss scale, and negated if maximising),
/// and for "update" (LAMB, You et al., 2019, https://arxiv.org/abs/1904.00962) u is the
/// step per unit of learning rate: the base's (w_after - w_before) / lr in lars_update_, or
/// LAMB's own m_hat / (sqrt(v_hat) + eps) + weight_decay * w in lars::LAMB.
///
/// `param_norms` holds |w| and `norms` holds n, one per parameter. T is at::Tensor (the
/// ratios of many parameters at once, `lr` a 0-dim tensor read only when `clip`: pure tensor
/// ops, nothing waits on the device) or double (one parameter's, as the fused CPU kernels
/// compute it). Every other LARS source refers to this statement.
template <typename T>
T trust_ratio(
    const T& param_norms,
    const T& norms,
    double weight_decay,
    const T& lr,
    double eps,
    double trust_coef,
    bool clip,
    TrustRatio variant = TrustRatio::kPaper);

extern template at::Tensor trust_ratio<at::Tensor>(
    const at::Tensor&, const at::Tensor&, double, const at::Tensor&, double, double, bool, TrustRatio);
extern template double trust_ratio<double>(
    const double&, const double&, double, const double&, double, double, bool, TrustRatio);

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

/// Scales the step a base optimizer just took, in place: trust_ratio "update" (LAMB) around
/// any base, the C++ twin of torchlars._functional.lars_update_. With u = (w - w_before) / lr
/// the base's step per unit of learning rate (its own weight decay included) and r from
/// `trust_ratio` on |w_before| and |u|:
///
///     w = w_before + r * (w - w_before)
///
/// `params_before[i]` holds params[i] before the base's step (overwritten). Multi-tensor ATen
/// ops per device and dtype, norms in fp32 for half types, no host synchronisation. Returns,
/// per (device, dtype), the parameters and the ratios used (in the norms' dtype).
std::vector<std::pair<std::vector<at::Tensor>, at::Tensor>> lars_update_(
    at::TensorList params,
    at::TensorList params_before,
    const at::Tensor& lr,
    double eps,
    double trust_coef,
    bool clip);

} // namespace lars
