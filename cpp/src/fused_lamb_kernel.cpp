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
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
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

// m and v of a block updated and stored, and returned as the rest of the step reads them
// (rounded to scalar_t for half types, as the second pass finds them in memory).
template <typename scalar_t, typename Count>
C10_ALWAYS_INLINE std::pair<Lanes<scalar_t>, Lanes<scalar_t>> update_moments(
    const scalar_t* grad,
    scalar_t* exp_avg,
    scalar_t* exp_avg_sq,
    int64_t i,
    Count count,
    const LambConstants<scalar_t>& k) {
  using Vec = typename Lanes<scalar_t>::Vec;
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
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    m = Lanes<scalar_t>::load(exp_avg + i, count);
    v = Lanes<scalar_t>::load(exp_avg_sq + i, count);
  }
  return {m, v};
}

// Pass 1 of an adapted step over a chunk: m and v updated in place, and the sums of squares of
// w and u; u written over g where the slot says so (g of the block is read by then).
template <typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> moments_and_square_sums(
    const LambSlot& slot,
    const Chunk& chunk,
    const LambConstants<scalar_t>& k) {
  const scalar_t* param = data_of<scalar_t>(slot.param);
  scalar_t* grad = mutable_data_of<scalar_t>(slot.grad);
  scalar_t* exp_avg = mutable_data_of<scalar_t>(slot.exp_avg);
  scalar_t* exp_avg_sq = mutable_data_of<scalar_t>(slot.exp_avg_sq);
  SquareSum<scalar_t> param_sum;
  SquareSum<scalar_t> update_sum;
  for_each_block(chunk.begin, chunk.end, [&](int64_t i, auto count) {
    const auto [m, v] = update_moments(grad, exp_avg, exp_avg_sq, i, count, k);
    const Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    const Lanes<scalar_t> u = lamb_update(m, v, w, k);
    if (slot.update_in_grad) {
      u.store(grad + i, count);
    }
    param_sum.add(w, count);
    update_sum.add(u, count);
  });
  return {param_sum.total(), update_sum.total()};
}

// w = w - (lr * r) * u over a chunk: pass 2 of an adapted step, with u read back from g where
// pass 1 left it there, else made again from m and v (by the same function: the same bits); or,
// `with_moments`, the one pass of a step that is not adapted (r = 1, AdamW's step), which
// updates m and v first.
template <typename scalar_t>
void update_chunk(
    const LambSlot& slot,
    const Chunk& chunk,
    at::opmath_type<scalar_t> step_size,
    const LambConstants<scalar_t>& k,
    bool with_moments) {
  using Vec = typename Lanes<scalar_t>::Vec;
  scalar_t* param = mutable_data_of<scalar_t>(slot.param);
  const scalar_t* grad = data_of<scalar_t>(slot.grad);
  scalar_t* exp_avg = mutable_data_of<scalar_t>(slot.exp_avg);
  scalar_t* exp_avg_sq = mutable_data_of<scalar_t>(slot.exp_avg_sq);
  const Vec step(step_size);
  // One loop per source of u, so that no test is made per block.
  const auto write = [&](const auto& make_update) {
    for_each_block(chunk.begin, chunk.end, [&](int64_t i, auto count) {
      const Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
      map(w, make_update(i, count, w), [&](const Vec& w_, const Vec& u_) { return w_ - u_ * step; })
          .store(param + i, count);
    });
  };
  if (with_moments) {
    write([&](int64_t i, auto count, const Lanes<scalar_t>& w) {
      const auto [m, v] = update_moments(grad, exp_avg, exp_avg_sq, i, count, k);
      return lamb_update(m, v, w, k);
    });
  } else if (slot.update_in_grad) {
    write([&](int64_t i, auto count, const Lanes<scalar_t>&) { return Lanes<scalar_t>::load(grad + i, count); });
  } else {
    write([&](int64_t i, auto count, const Lanes<scalar_t>& w) {
      return lamb_update(Lanes<scalar_t>::load(exp_avg + i, count), Lanes<scalar_t>::load(exp_avg_sq + i, count), w, k);
    });
  }
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
  if (!adapt) {
    const std::vector<Chunk> chunks = chunks_of(numels, 0, static_cast<int64_t>(numels.size()));
    const auto step_size = static_cast<opmath_t>(options.lr());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        update_chunk<scalar_t>(slots[chunks[c].tensor], chunks[c], step_size, constants[chunks[c].tensor], true);
      }
    });
    for (const auto i : c10::irange(static_cast<int64_t>(slots.size()))) {
      write_ratio(trust_ratios, i, 1.0);
    }
    return;
  }
  two_passes<opmath_t>(
      numels, kBatchNumel,
      [&](const Chunk& chunk) {
        return moments_and_square_sums<scalar_t>(slots[chunk.tensor], chunk, constants[chunk.tensor]);
      },
      [&](int64_t i, double param_norm, double update_norm) {
        double ratio = trust_ratio(
            param_norm, update_norm, 0.0, options.lr(), options.trust_eps(), options.trust_coef(), false,
            TrustRatio::kUpdate);
        ratio = options.trust_clip() ? std::min(ratio, 1.0) : ratio;
        write_ratio(trust_ratios, i, ratio);
        return static_cast<opmath_t>(options.lr() * ratio);
      },
      [&](const Chunk& chunk, opmath_t step_size) {
        update_chunk<scalar_t>(slots[chunk.tensor], chunk, step_size, constants[chunk.tensor], false);
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
