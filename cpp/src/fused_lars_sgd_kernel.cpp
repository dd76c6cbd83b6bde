// The vectorised loops of the fused LARS + momentum-SGD step (lars/fused.h), compiled once
// per CPU capability (fused_kernels.h). They have the shape of ATen's fused SGD kernel
// (aten/src/ATen/native/cpu/FusedSGDKernel.cpp): at::vec, fp32 arithmetic for half types,
// at::parallel_for over fixed-size chunks, grad_scale folded in; and one addition, a first
// pass for the norms the trust ratio needs (of w, and of g or of the decayed g + wd * w)
// before the update (fused_kernel_loops.h).

#include "fused_kernels.h"

#include "fused_kernel_loops.h"

#include <lars/functional.h>
#include <lars/lars_sgd.h>

#include <ATen/Dispatch.h>

#include <optional>
#include <utility>
#include <vector>

namespace lars::fused_kernel::LARS_CPU_CAPABILITY {

namespace {

using at::vec::Vectorized;

// How the first pass makes, from g, the vector whose norm the trust ratio divides by: g
// divided by the loss scale (if any) for "paper"; for "decayed" (chunk_square_sums<true>)
// also negated if maximising and decayed, d = g + weight_decay * w, the very values the
// update then scales.
template <typename opmath_t>
struct NormedGradient {
  const opmath_t* scale; // null without a loss scale
  bool maximize;
  opmath_t weight_decay;
};

// The sums of squares of param[begin, end) and of grad[begin, end), made as `normed` says,
// in one loop over both: each summed in the order in which it would be alone.
template <bool kDecayed, typename scalar_t>
std::pair<at::opmath_type<scalar_t>, at::opmath_type<scalar_t>> chunk_square_sums(
    const scalar_t* grad,
    const scalar_t* param,
    int64_t begin,
    int64_t end,
    const NormedGradient<at::opmath_type<scalar_t>>& normed) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  SquareSum<scalar_t> grad_sum;
  SquareSum<scalar_t> param_sum;
  const bool unscale = normed.scale != nullptr;
  const Vec divisor(unscale ? *normed.scale : opmath_t(1));
  const bool maximize = normed.maximize;
  const bool decay = normed.weight_decay != 0;
  const Vec weight_decay(normed.weight_decay);
  for_each_block(begin, end, [&](int64_t i, auto count) {
    Lanes<scalar_t> g = Lanes<scalar_t>::load(grad + i, count);
    if (unscale) {
      g = map(g, [&](const Vec& v) { return v / divisor; });
    }
    const Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    if constexpr (kDecayed) { // as update_chunk makes d, to the bit
      if (maximize) {
        g = map(g, [](const Vec& v) { return v.neg(); });
      }
      if (decay) {
        g = map(g, w, [&](const Vec& v, const Vec& p) { return v + weight_decay * p; });
      }
    }
    param_sum.add(w, count);
    grad_sum.add(g, count);
  });
  return {param_sum.total(), grad_sum.total()};
}

// The update of elements [begin, end) of one tensor.
template <typename scalar_t>
void update_chunk(
    const SgdSlot& slot,
    int64_t begin,
    int64_t end,
    at::opmath_type<scalar_t> ratio,
    const LARSSGDOptions& options,
    bool is_first_step,
    const at::opmath_type<scalar_t>* grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  scalar_t* param = mutable_data_of<scalar_t>(slot.param);
  const scalar_t* grad = data_of<scalar_t>(slot.grad);
  scalar_t* buf = options.momentum() != 0 ? mutable_data_of<scalar_t>(slot.momentum_buffer) : nullptr;
  const Vec lr(static_cast<opmath_t>(options.lr()));
  const Vec weight_decay(static_cast<opmath_t>(options.weight_decay()));
  const Vec momentum(static_cast<opmath_t>(options.momentum()));
  const Vec one_minus_dampening(static_cast<opmath_t>(1 - options.dampening()));
  const Vec trust_ratio(ratio);
  // Copies, which the stores below cannot alias: the loop keeps them in registers.
  const bool unscale = grad_scale != nullptr;
  const Vec scale(unscale ? *grad_scale : opmath_t(1));
  const bool maximize = options.maximize();
  const bool decay = options.weight_decay() != 0;
  const bool nesterov = options.nesterov();
  for_each_block(begin, end, [&](int64_t i, auto count) {
    Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    Lanes<scalar_t> d = Lanes<scalar_t>::load(grad + i, count);
    if (unscale) {
      d = map(d, [&](const Vec& g) { return g / scale; });
    }
    if (maximize) {
      d = map(d, [](const Vec& g) { return g.neg(); });
    }
    if (decay) {
      d = map(d, w, [&](const Vec& g, const Vec& p) { return g + weight_decay * p; });
    }
    d = map(d, [&](const Vec& g) { return g * trust_ratio; });
    if (buf != nullptr) {
      Lanes<scalar_t> b = is_first_step
          ? d
          : map(Lanes<scalar_t>::load(buf + i, count), d, [&](const Vec& m, const Vec& g) {
              return m * momentum + g * one_minus_dampening;
            });
      b.store(buf + i, count);
      d = nesterov ? map(d, b, [&](const Vec& g, const Vec& m) { return g + m * momentum; }) : b;
    }
    map(w, d, [&](const Vec& p, const Vec& g) { return p - g * lr; }).store(param + i, count);
  });
}

template <typename scalar_t>
void lars_sgd_typed(
    const std::vector<SgdSlot>& slots,
    const at::Tensor& trust_ratios,
    const LARSSGDOptions& options,
    bool is_first_step,
    const std::optional<double>& grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = grad_scale ? static_cast<opmath_t>(*grad_scale) : 0;
  const opmath_t* scale_ptr = grad_scale ? &scale : nullptr;
  const bool decayed = options.trust_ratio() == TrustRatio::kDecayed;
  const NormedGradient<opmath_t> normed{scale_ptr, options.maximize(), static_cast<opmath_t>(options.weight_decay())};
  std::vector<int64_t> numels;
  for (const auto& slot : slots) {
    numels.push_back(slot.param.numel());
  }
  two_passes<opmath_t>(
      numels,
      [&](int64_t i, int64_t begin, int64_t end) {
        const scalar_t* grad = data_of<scalar_t>(slots[i].grad);
        const scalar_t* param = data_of<scalar_t>(slots[i].param);
        return decayed ? chunk_square_sums<true>(grad, param, begin, end, normed)
                       : chunk_square_sums<false>(grad, param, begin, end, normed);
      },
      [&](int64_t i, double param_norm, double grad_norm) {
        const double ratio = trust_ratio(
            param_norm, grad_norm, options.weight_decay(), options.lr(), options.eps(), options.trust_coef(),
            options.clip(), options.trust_ratio());
        write_ratio(trust_ratios, i, ratio);
        return static_cast<opmath_t>(ratio);
      },
      [&](int64_t i, int64_t begin, int64_t end, opmath_t ratio) {
        update_chunk<scalar_t>(slots[i], begin, end, ratio, options, is_first_step, scale_ptr);
      });
}

} // namespace

void lars_sgd(
    const std::vector<SgdSlot>& slots,
    const at::Tensor& trust_ratios,
    const LARSSGDOptions& options,
    bool is_first_step,
    const std::optional<double>& grad_scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, slots[0].param.scalar_type(), "lars_sgd_", [&] {
    lars_sgd_typed<scalar_t>(slots, trust_ratios, options, is_first_step, grad_scale);
  });
}

} // namespace lars::fused_kernel::LARS_CPU_CAPABILITY
