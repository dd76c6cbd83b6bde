// The vectorised loops of the fused LAMB step (lars/fused.h), compiled once per CPU
// capability (fused_kernels.h). The shape of ATen's fused Adam kernel
// (aten/src/ATen/native/cpu/FusedAdamKernel.cpp: at::vec, fp32 arithmetic for half types,
// grad_scale folded in) split in the two passes of the LARS kernel (fused_kernel_loops.h):
// the first updates m and v and sums |w|^2 and |u|^2, the second recomputes u from m and v,
// by the same function so to the bit, and writes w.

#include "fused_kernels.h"

#include "fused_kernel_loops.h"

#include <lars/functional.h>
#include <lars/lamb.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace lars::fused_kernel::LARS_CPU_CAPABILITY {

namespace {

using at::vec::Vectorized;

// Elements of a batch (fused_kernel_loops.h's two_passes): w, g, m and v of 2**16 elements (1 MB
// in fp32) stay in a core's L2 between the passes (bench/bench_lamb_fused.py).
constexpr int64_t kBatchNumel = int64_t{1} << 16;

// The constants of one tensor's step, as vectors.
template <typename scalar_t>
struct LambConstants {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;

  LambConstants(const LAMBOptions& options, double step, const std::optional<double>& grad_scale)
      : beta1(static_cast<opmath_t>(std::get<0>(options.betas()))),
        one_minus_beta1(static_cast<opmath_t>(1 - std::get<0>(options.betas()))),
        beta2(static_cast<opmath_t>(std::get<1>(options.betas()))),
        one_minus_beta2(static_cast<opmath_t>(1 - std::get<1>(options.betas()))),
        inverse_bias_correction1(static_cast<opmath_t>(
            options.bias_correction() ? 1 / (1 - std::pow(std::get<0>(options.betas()), step)) : 1.0)),
        inverse_bias_correction2_sqrt(static_cast<opmath_t>(
            options.bias_correction() ? 1 / std::sqrt(1 - std::pow(std::get<1>(options.betas()), step)) : 1.0)),
        eps(static_cast<opmath_t>(options.eps())),
        weight_decay(static_cast<opmath_t>(options.weight_decay())),
        scale(static_cast<opmath_t>(grad_scale.value_or(1.0))),
        unscale(grad_scale.has_value()),
        maximize(options.maximize()),
        decay(options.weight_decay() != 0) {}

  // The bias corrections as factors: one division per element (by the denominator), not three.
  Vec beta1, one_minus_beta1, beta2, one_minus_beta2, inverse_bias_correction1, inverse_bias_correction2_sqrt, eps,
      weight_decay, scale;
  bool unscale, maximize, decay;
};

// u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + weight_decay * w: eps where timm's Lamb puts it
// (added to the bias-corrected sqrt(v)).
template <typename scalar_t>
C10_ALWAYS_INLINE Lanes<scalar_t> lamb_update(
    const Lanes<scalar_t>& m,
    const Lanes<scalar_t>& v,
    const Lanes<scalar_t>& w,
    const LambConstants<scalar_t>& k) {
  using Vec = typename Lanes<scalar_t>::Vec;
  Lanes<scalar_t> u = map(m, v, [&](const Vec& m_, const Vec& v_) {
    return (m_ * k.inverse_bias_correction1) / (v_.sqrt() * k.inverse_bias_correction2_sqrt + k.eps);
  });
  if (k.decay) {
    u = map(u, w, [&](const Vec& u_, const Vec& w_) { return u_ + k.weight_decay * w_; });
  }
  return u;
}

// Pass 1 over a chunk: m and v updated in place, and the sums of squares of w and (when
// `adapt`) of u. u is also kept in `scratch` (at the chunk's place in its batch) where given.
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> moments_and_square_sums(
    const LambSlot& slot,
    const Chunk& chunk,
    const LambConstants<scalar_t>& k,
    bool adapt,
    scalar_t* scratch) {
  using Vec = typename Lanes<scalar_t>::Vec;
  const scalar_t* param = data_of<scalar_t>(slot.param);
  const scalar_t* grad = data_of<scalar_t>(slot.grad);
  scalar_t* exp_avg = mutable_data_of<scalar_t>(slot.exp_avg);
  scalar_t* exp_avg_sq = mutable_data_of<scalar_t>(slot.exp_avg_sq);
  SquareSum<scalar_t> param_sum;
  SquareSum<scalar_t> update_sum;
  for_each_block(chunk.begin, chunk.end, [&](int64_t i, auto count) {
    Lanes<scalar_t> g = Lanes<scalar_t>::load(grad + i, count);
    if (k.unscale) {
      g = map(g, [&](const Vec& x) { return x / k.scale; });
    }
    if (k.maximize) {
      g = map(g, [](const Vec& x) { return x.neg(); });
    }
    Lanes<scalar_t> m = map(Lanes<scalar_t>::load(exp_avg + i, count), g, [&](const Vec& m_, const Vec& g_) {
      return m_ * k.beta1 + g_ * k.one_minus_beta1;
    });
    Lanes<scalar_t> v = map(Lanes<scalar_t>::load(exp_avg_sq + i, count), g, [&](const Vec& v_, const Vec& g_) {
      return v_ * k.beta2 + g_ * g_ * k.one_minus_beta2;
    });
    m.store(exp_avg + i, count);
    v.store(exp_avg_sq + i, count);
    if (!adapt && scratch == nullptr) {
      return;
    }
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      // u from the rounded m and v that pass 2 reads.
      m = Lanes<scalar_t>::load(exp_avg + i, count);
      v = Lanes<scalar_t>::load(exp_avg_sq + i, count);
    }
    const Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    const Lanes<scalar_t> u = lamb_update(m, v, w, k);
    if (scratch != nullptr) {
      u.store(scratch + chunk.in_batch + (i - chunk.begin), count);
    }
    param_sum.add(w, count);
    update_sum.add(u, count);
  });
  return {param_sum.total(), update_sum.total()};
}

// Pass 2 over a chunk: w = w - (lr * r) * u, u read from `scratch` where given, else made again
// from m and v (by the same function: the same bits).
template <typename scalar_t>
void update_chunk(
    const LambSlot& slot,
    const Chunk& chunk,
    at::opmath_type<scalar_t> step_size,
    const LambConstants<scalar_t>& k,
    const scalar_t* scratch) {
  using Vec = typename Lanes<scalar_t>::Vec;
  scalar_t* param = mutable_data_of<scalar_t>(slot.param);
  const scalar_t* exp_avg = data_of<scalar_t>(slot.exp_avg);
  const scalar_t* exp_avg_sq = data_of<scalar_t>(slot.exp_avg_sq);
  const Vec step(step_size);
  for_each_block(chunk.begin, chunk.end, [&](int64_t i, auto count) {
    const Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    const Lanes<scalar_t> u = scratch != nullptr
        ? Lanes<scalar_t>::load(scratch + chunk.in_batch + (i - chunk.begin), count)
        : lamb_update(Lanes<scalar_t>::load(exp_avg + i, count), Lanes<scalar_t>::load(exp_avg_sq + i, count), w, k);
    map(w, u, [&](const Vec& w_, const Vec& u_) { return w_ - u_ * step; }).store(param + i, count);
  });
}

template <typename scalar_t>
void lamb_typed(
    const std::vector<LambSlot>& slots,
    const at::Tensor& trust_ratios,
    const LAMBOptions& options,
    bool adapt,
    const std::optional<double>& grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> numels;
  std::vector<LambConstants<scalar_t>> constants;
  for (const auto& slot : slots) {
    numels.push_back(slot.param.numel());
    constants.emplace_back(options, slot.step, grad_scale);
  }
  // fp32 and fp64 keep u of a batch between the passes instead of making it again: a write and
  // a read of u for two reads of m and v, and one sqrt and one division per element instead of
  // two (the step is bound by them on one core). Half types make u again: u in fp32 would cost
  // more memory traffic than m and v in 16 bits. So does a tensor of more than 16 MB: a scratch
  // that large is mapped anew by malloc every step, a page fault per 4 KB (an embedding of 23M
  // elements stepped in 2.5x AdamW's time with it, 1.8x without).
  constexpr int64_t kScratchNumel = (int64_t{16} << 20) / static_cast<int64_t>(sizeof(scalar_t));
  int64_t scratch_numel = 0;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (adapt) {
      scratch_numel = kBatchNumel;
      for (const int64_t numel : numels) {
        if (numel <= kScratchNumel) {
          scratch_numel = std::max(scratch_numel, numel);
        }
      }
    }
  }
  // Uninitialised: pass 1 writes every element pass 2 reads.
  const std::unique_ptr<scalar_t[]> scratch(scratch_numel > 0 ? new scalar_t[scratch_numel] : nullptr);
  const auto scratch_of = [&](const Chunk& chunk) -> scalar_t* {
    return numels[chunk.tensor] <= scratch_numel ? scratch.get() : nullptr;
  };
  two_passes<opmath_t>(
      numels, kBatchNumel,
      [&](const Chunk& chunk) {
        return moments_and_square_sums<scalar_t>(
            slots[chunk.tensor], chunk, constants[chunk.tensor], adapt, scratch_of(chunk));
      },
      [&](int64_t i, double param_norm, double update_norm) {
        double ratio = 1.0;
        if (adapt) {
          ratio = trust_ratio(
              param_norm, update_norm, 0.0, options.lr(), options.trust_eps(), options.trust_coef(), false,
              TrustRatio::kUpdate);
          ratio = options.trust_clip() ? std::min(ratio, 1.0) : ratio;
        }
        write_ratio(trust_ratios, i, ratio);
        return static_cast<opmath_t>(options.lr() * ratio);
      },
      [&](const Chunk& chunk, opmath_t step_size) {
        update_chunk<scalar_t>(slots[chunk.tensor], chunk, step_size, constants[chunk.tensor], scratch_of(chunk));
      });
}

} // namespace

void lamb(
    const std::vector<LambSlot>& slots,
    const at::Tensor& trust_ratios,
    const LAMBOptions& options,
    bool adapt,
    const std::optional<double>& grad_scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, slots[0].param.scalar_type(), "lamb_", [&] {
    lamb_typed<scalar_t>(slots, trust_ratios, options, adapt, grad_scale);
  });
}

} // namespace lars::fused_kernel::LARS_CPU_CAPABILITY
