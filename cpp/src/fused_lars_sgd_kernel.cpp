// The vectorised loops of the fused LARS + momentum-SGD step (lars/fused.h), compiled once
// per CPU capability (fused_lars_sgd_kernel.h). They have the shape of ATen's fused SGD
// kernel (aten/src/ATen/native/cpu/FusedSGDKernel.cpp): at::vec, fp32 arithmetic for half
// types, at::parallel_for over fixed-size chunks, grad_scale folded in; and one addition, a
// first pass for the norms the trust ratio needs (of w, and of g or of the decayed
// g + wd * w) before the update.
//
// Norms are summed in an order fixed by the tensor's size alone: kLanes partial sums per
// chunk of kChunkNumel elements, the lanes then the chunks added in index order (and the
// compiler may not fuse a multiply and an add: -ffp-contract=off). So a step gives the same
// bits whatever the thread count or the CPU capability.

#include "fused_lars_sgd_kernel.h"

#include <lars/functional.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace lars::fused_kernel::LARS_CPU_CAPABILITY {

namespace {

using at::vec::Vectorized;

// Elements handled together, and the number of partial sums of squares in a chunk: a whole
// number of vectors in every build (an AVX-512 vector holds 32 bf16). Element i of a chunk
// adds to lane i % kLanes, with separate multiplies and adds, so every build sums the same
// numbers in the same order: the norms do not depend on the CPU capability either.
constexpr int64_t kLanes = 32;
// Elements per chunk, the unit of parallel work and of the norms' partial sums.
constexpr int64_t kChunkNumel = int64_t{1} << 14;
// A batch of small tensors (or one larger tensor) is reduced, then updated, while its
// gradients are still in cache (the L2 of a core; bench/cpp).
constexpr int64_t kBatchNumel = int64_t{1} << 17;

// kLanes consecutive elements of a scalar_t tensor, in opmath_t (fp32 for half types).
template <typename scalar_t>
struct Lanes {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr int kVecs = kLanes / Vec::size();
  static_assert(kLanes % Vec::size() == 0, "kLanes must be a whole number of vectors");

  std::array<Vec, kVecs> vecs;

  // The first `count` elements at `data`; the rest of the lanes are 0. (`Count` is
  // std::integral_constant for a full block: the tests below then fold away.)
  template <typename Count>
  C10_ALWAYS_INLINE static Lanes load(const scalar_t* data, Count count) {
    if (count < kLanes) {
      scalar_t padded[kLanes] = {};
      std::memcpy(padded, data, count * sizeof(scalar_t));
      return load(padded, std::integral_constant<int64_t, kLanes>());
    }
    Lanes lanes;
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      constexpr int kSize = Vectorized<scalar_t>::size();
      static_assert(kLanes % kSize == 0 && 2 * Vec::size() == kSize, "unexpected vector sizes");
      for (int i = 0; i < kLanes / kSize; ++i) {
        auto [low, high] = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(data + i * kSize));
        lanes.vecs[2 * i] = low;
        lanes.vecs[2 * i + 1] = high;
      }
    } else {
      for (int i = 0; i < kVecs; ++i) {
        lanes.vecs[i] = Vec::loadu(data + i * Vec::size());
      }
    }
    return lanes;
  }

  // Writes the first `count` lanes to `data`, rounded to scalar_t.
  template <typename Count>
  C10_ALWAYS_INLINE void store(scalar_t* data, Count count) const {
    if (count < kLanes) {
      scalar_t padded[kLanes];
      store(padded, std::integral_constant<int64_t, kLanes>());
      std::memcpy(data, padded, count * sizeof(scalar_t));
      return;
    }
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      constexpr int kSize = Vectorized<scalar_t>::size();
      for (int i = 0; i < kLanes / kSize; ++i) {
        at::vec::convert_from_float<scalar_t>(vecs[2 * i], vecs[2 * i + 1]).store(data + i * kSize);
      }
    } else {
      for (int i = 0; i < kVecs; ++i) {
        vecs[i].store(data + i * Vec::size());
      }
    }
  }
};

// Element-wise f over the lanes of a.
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE Lanes<scalar_t> map(const Lanes<scalar_t>& a, F f) {
  Lanes<scalar_t> out;
  for (int i = 0; i < Lanes<scalar_t>::kVecs; ++i) {
    out.vecs[i] = f(a.vecs[i]);
  }
  return out;
}

// Element-wise f over the lanes of a and b.
template <typename scalar_t, typename F>
C10_ALWAYS_INLINE Lanes<scalar_t> map(const Lanes<scalar_t>& a, const Lanes<scalar_t>& b, F f) {
  Lanes<scalar_t> out;
  for (int i = 0; i < Lanes<scalar_t>::kVecs; ++i) {
    out.vecs[i] = f(a.vecs[i], b.vecs[i]);
  }
  return out;
}

// One sum of squares per lane; the order of additions is fixed by the element indices.
template <typename scalar_t>
struct SquareSum {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;

  std::array<Vec, Lanes<scalar_t>::kVecs> sums{};

  // Adds the squares of the first `count` lanes.
  template <typename Count>
  C10_ALWAYS_INLINE void add(const Lanes<scalar_t>& lanes, Count count) {
    for (int i = 0; i < Lanes<scalar_t>::kVecs; ++i) {
      const int64_t in_vec = std::clamp<int64_t>(count - i * Vec::size(), 0, Vec::size());
      const Vec x = in_vec == Vec::size() ? lanes.vecs[i] : Vec::set(Vec(0), lanes.vecs[i], in_vec);
      sums[i] = sums[i] + x * x;
    }
  }

  opmath_t total() const {
    opmath_t lanes[kLanes];
    for (int i = 0; i < Lanes<scalar_t>::kVecs; ++i) {
      sums[i].store(lanes + i * Vec::size());
    }
    opmath_t total = 0;
    for (const opmath_t lane : lanes) {
      total += lane;
    }
    return total;
  }
};

// Calls block(i, count) for the blocks of kLanes elements of [begin, end): the full ones
// with a compile-time count, so that their loads, stores and sums need no tests; then the
// rest, if any.
template <typename Block>
C10_ALWAYS_INLINE void for_each_block(int64_t begin, int64_t end, const Block& block) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    block(i, std::integral_constant<int64_t, kLanes>());
  }
  if (i < end) {
    block(i, end - i);
  }
}

// A run of consecutive elements of one tensor.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunks of tensors [first, last), in order.
std::vector<Chunk> chunks_of(const std::vector<int64_t>& numels, int64_t first, int64_t last) {
  std::vector<Chunk> chunks;
  for (int64_t i = first; i < last; ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkNumel) {
      chunks.push_back({i, begin, std::min(begin + kChunkNumel, numels[i])});
    }
  }
  return chunks;
}

// The norm of tensor `chunks[first].tensor` from the partial sums of its chunks [first, last).
template <typename opmath_t>
float norm_from_partials(const std::vector<opmath_t>& partials, size_t first, size_t last) {
  double sum = 0;
  for (size_t c = first; c < last; ++c) {
    sum += partials[c];
  }
  return static_cast<float>(std::sqrt(sum));
}

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

// The sums of squares of grad[begin, end), made as `normed` says, and of param[begin, end),
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
  return {grad_sum.total(), param_sum.total()};
}

// Walks memory in order: the tensors are dense (fused_lars_sgd.cpp sees to it).
template <typename scalar_t>
const scalar_t* data_of(const at::Tensor& tensor) {
  return static_cast<const scalar_t*>(tensor.const_data_ptr());
}

template <typename scalar_t>
scalar_t* mutable_data_of(const at::Tensor& tensor) {
  return static_cast<scalar_t*>(tensor.mutable_data_ptr());
}

// The update of elements [begin, end) of one tensor.
template <typename scalar_t>
void update_chunk(
    const Slot& slot,
    int64_t begin,
    int64_t end,
    at::opmath_type<scalar_t> ratio,
    const SgdOptions& options,
    const at::opmath_type<scalar_t>* grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = typename Lanes<scalar_t>::Vec;
  scalar_t* param = mutable_data_of<scalar_t>(slot.param);
  const scalar_t* grad = data_of<scalar_t>(slot.grad);
  scalar_t* buf = options.momentum != 0 ? mutable_data_of<scalar_t>(slot.momentum_buffer) : nullptr;
  const Vec lr(static_cast<opmath_t>(options.lr));
  const Vec weight_decay(static_cast<opmath_t>(options.weight_decay));
  const Vec momentum(static_cast<opmath_t>(options.momentum));
  const Vec one_minus_dampening(static_cast<opmath_t>(1 - options.dampening));
  const Vec trust_ratio(ratio);
  // Copies, which the stores below cannot alias: the loop keeps them in registers.
  const bool unscale = grad_scale != nullptr;
  const Vec scale(unscale ? *grad_scale : opmath_t(1));
  const bool maximize = options.maximize;
  const bool decay = options.weight_decay != 0;
  const bool is_first_step = options.is_first_step;
  const bool nesterov = options.nesterov;
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
    const std::vector<Slot>& slots,
    const at::Tensor& trust_ratios,
    const SgdOptions& options,
    const std::optional<double>& grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = grad_scale ? static_cast<opmath_t>(*grad_scale) : 0;
  const opmath_t* scale_ptr = grad_scale ? &scale : nullptr;
  const bool decayed = options.variant == TrustRatio::kDecayed;
  const NormedGradient<opmath_t> normed{scale_ptr, options.maximize, static_cast<opmath_t>(options.weight_decay)};
  std::vector<int64_t> numels;
  for (const auto& slot : slots) {
    numels.push_back(slot.param.numel());
  }
  std::vector<opmath_t> ratios(slots.size());
  // Batch by batch, so that the update finds the gradients that the norm pass just read
  // still in cache.
  for (int64_t first = 0; first < static_cast<int64_t>(slots.size());) {
    int64_t last = first + 1;
    for (int64_t batch_numel = numels[first]; last < static_cast<int64_t>(slots.size()) &&
         batch_numel + numels[last] <= kBatchNumel;
         ++last) {
      batch_numel += numels[last];
    }
    const std::vector<Chunk> chunks = chunks_of(numels, first, last);
    std::vector<opmath_t> partials(chunks.size());
    std::vector<opmath_t> param_partials(chunks.size());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        const Slot& slot = slots[chunk.tensor];
        const scalar_t* grad = data_of<scalar_t>(slot.grad);
        const scalar_t* param = data_of<scalar_t>(slot.param);
        std::tie(partials[c], param_partials[c]) = decayed
            ? chunk_square_sums<true>(grad, param, chunk.begin, chunk.end, normed)
            : chunk_square_sums<false>(grad, param, chunk.begin, chunk.end, normed);
      }
    });
    for (size_t c = 0; c < chunks.size();) {
      const int64_t i = chunks[c].tensor;
      const size_t next = c + (numels[i] + kChunkNumel - 1) / kChunkNumel;
      const double param_norm = norm_from_partials(param_partials, c, next);
      const double grad_norm = norm_from_partials(partials, c, next);
      ratios[i] = static_cast<opmath_t>(trust_ratio(
          param_norm, grad_norm, options.weight_decay, options.lr, options.eps, options.trust_coef, options.clip,
          options.variant));
      if (trust_ratios.defined()) {
        trust_ratios.accessor<float, 1>()[i] = static_cast<float>(ratios[i]);
      }
      c = next;
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        update_chunk<scalar_t>(slots[chunk.tensor], chunk.begin, chunk.end, ratios[chunk.tensor], options, scale_ptr);
      }
    });
    first = last;
  }
}

} // namespace

void lars_sgd(
    const std::vector<Slot>& slots,
    const at::Tensor& trust_ratios,
    const SgdOptions& options,
    const std::optional<double>& grad_scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, slots[0].param.scalar_type(), "lars_sgd_", [&] {
    lars_sgd_typed<scalar_t>(slots, trust_ratios, options, grad_scale);
  });
}

} // namespace lars::fused_kernel::LARS_CPU_CAPABILITY
