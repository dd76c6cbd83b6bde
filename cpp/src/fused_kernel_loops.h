#pragma once

// What the fused kernels' loops share (fused_lars_sgd_kernel.cpp, fused_lamb_kernel.cpp),
// included in each build per CPU capability: kLanes elements at a time in at::vec vectors of
// opmath_t (fp32 for half types, fp64 for fp64), sums of squares in an order fixed by the
// tensors' sizes, and the two passes over a batch of tensors (norms, then the update).
//
// Norms are summed in an order fixed by the tensor's size alone: kLanes partial sums per
// chunk of kChunkNumel elements, the lanes then the chunks added in index order (and the
// compiler may not fuse a multiply and an add: -ffp-contract=off). So a step gives the same
// bits whatever the thread count or the CPU capability.

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

namespace lars::fused_kernel::LARS_CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements handled together, and the number of partial sums of squares in a chunk: a whole
// number of vectors in every build (an AVX-512 vector holds 32 bf16). Element i of a chunk
// adds to lane i % kLanes, with separate multiplies and adds, so every build sums the same
// numbers in the same order: the norms do not depend on the CPU capability either.
constexpr int64_t kLanes = 32;
// Elements per chunk, the unit of parallel work and of the norms' partial sums.
constexpr int64_t kChunkNumel = int64_t{1} << 14;

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
inline std::vector<Chunk> chunks_of(const std::vector<int64_t>& numels, int64_t first, int64_t last) {
  std::vector<Chunk> chunks;
  for (int64_t i = first; i < last; ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kChunkNumel) {
      chunks.push_back({i, begin, std::min(begin + kChunkNumel, numels[i])});
    }
  }
  return chunks;
}

// The norm of tensor `chunks[first].tensor` from the partial sums of its chunks [first, last),
// summed in fp64 and returned in opmath_t: fp32 for fp32 and half types, fp64 for fp64.
template <typename opmath_t>
opmath_t norm_from_partials(const std::vector<opmath_t>& partials, size_t first, size_t last) {
  double sum = 0;
  for (size_t c = first; c < last; ++c) {
    sum += partials[c];
  }
  return static_cast<opmath_t>(std::sqrt(sum));
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

// The two passes of a fused step over tensors of sizes `numels`, batch by batch (small tensors
// up to `batch_numel` elements together, or one larger tensor), so that the update finds in
// cache (the L2 of a core) what the first pass read:
//   square_sums(chunk) -> (sum of w^2, sum of n^2) of the chunk's elements, where n is the
//       vector whose norm the ratio divides by;
//   ratio(tensor, |w|, |n|) -> what the update of the tensor takes (opmath_t): its trust
//       ratio, or the step size made from it;
//   update(chunk, ratio) writes the chunk's elements.
// A batch holds at most max(batch_numel, the largest numel) elements.
// The chunks of a pass run in parallel; the ratios are taken in tensor order.
template <typename opmath_t, typename SquareSums, typename Ratio, typename Update>
void two_passes(
    const std::vector<int64_t>& numels,
    int64_t batch_numel,
    const SquareSums& square_sums,
    const Ratio& ratio,
    const Update& update) {
  const auto count = static_cast<int64_t>(numels.size());
  std::vector<opmath_t> ratios(numels.size());
  for (int64_t first = 0; first < count;) {
    int64_t last = first + 1;
    for (int64_t numel = numels[first]; last < count && numel + numels[last] <= batch_numel; ++last) {
      numel += numels[last];
    }
    const std::vector<Chunk> chunks = chunks_of(numels, first, last);
    std::vector<opmath_t> param_partials(chunks.size());
    std::vector<opmath_t> partials(chunks.size());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        std::tie(param_partials[c], partials[c]) = square_sums(chunks[c]);
      }
    });
    for (size_t c = 0; c < chunks.size();) {
      const int64_t i = chunks[c].tensor;
      const size_t next = c + (numels[i] + kChunkNumel - 1) / kChunkNumel;
      ratios[i] = ratio(i, norm_from_partials(param_partials, c, next), norm_from_partials(partials, c, next));
      c = next;
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        update(chunks[c], ratios[chunks[c].tensor]);
      }
    });
    first = last;
  }
}

// Writes `ratio` to trust_ratios[i] (fp32 or fp64, CPU), if trust_ratios is defined.
inline void write_ratio(const at::Tensor& trust_ratios, int64_t i, double ratio) {
  if (!trust_ratios.defined()) {
    return;
  }
  const int64_t offset = i * trust_ratios.stride(0);
  if (trust_ratios.scalar_type() == at::kDouble) {
    trust_ratios.mutable_data_ptr<double>()[offset] = ratio;
  } else {
    trust_ratios.mutable_data_ptr<float>()[offset] = static_cast<float>(ratio);
  }
}

} // namespace lars::fused_kernel::LARS_CPU_CAPABILITY
