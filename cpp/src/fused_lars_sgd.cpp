// The fused LARS + momentum-SGD CPU kernel (fused.h). It has the shape of ATen's fused SGD
// kernel (aten/src/ATen/native/cpu/FusedSGDKernel.cpp): at::vec, fp32 arithmetic for half
// types, at::parallel_for over fixed-size chunks, grad_scale and found_inf folded in; and two
// additions, the gradient norm before the update and the parameter norm during it.
//
// Norms are summed in an order fixed by the tensor's size alone: kLanes partial sums per
// chunk of kChunkNumel elements, the lanes then the chunks added in index order. So a norm
// is the same bit for bit whatever the thread count, and the norm `lars_sgd_` carries equals
// the one `lars_param_norms` recomputes.

#include <lars/fused.h>
#include <lars/functional.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

namespace lars {

namespace {

using at::vec::Vectorized;

// Elements handled together, and the number of partial sums of squares in a chunk.
constexpr int64_t kLanes = 16;
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

  // The first `count` elements at `data`; the rest of the lanes are 0.
  static Lanes load(const scalar_t* data, int64_t count) {
    if (count < kLanes) {
      scalar_t padded[kLanes] = {};
      std::memcpy(padded, data, count * sizeof(scalar_t));
      return load(padded, kLanes);
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
  void store(scalar_t* data, int64_t count) const {
    if (count < kLanes) {
      scalar_t padded[kLanes];
      store(padded, kLanes);
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
Lanes<scalar_t> map(const Lanes<scalar_t>& a, F f) {
  Lanes<scalar_t> out;
  for (int i = 0; i < Lanes<scalar_t>::kVecs; ++i) {
    out.vecs[i] = f(a.vecs[i]);
  }
  return out;
}

// Element-wise f over the lanes of a and b.
template <typename scalar_t, typename F>
Lanes<scalar_t> map(const Lanes<scalar_t>& a, const Lanes<scalar_t>& b, F f) {
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
  void add(const Lanes<scalar_t>& lanes, int64_t count) {
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

// The sum of squares of data[begin, end), divided by `scale` first if not null.
template <typename scalar_t>
at::opmath_type<scalar_t> chunk_square_sum(
    const scalar_t* data, int64_t begin, int64_t end, const at::opmath_type<scalar_t>* scale) {
  using Vec = typename Lanes<scalar_t>::Vec;
  SquareSum<scalar_t> sum;
  for (int64_t i = begin; i < end; i += kLanes) {
    const int64_t count = std::min(kLanes, end - i);
    Lanes<scalar_t> x = Lanes<scalar_t>::load(data + i, count);
    if (scale != nullptr) {
      x = map(x, [&](const Vec& v) { return v / Vec(*scale); });
    }
    sum.add(x, count);
  }
  return sum.total();
}

// Walks memory in order: the tensors are laid out densely (see `dense_like`).
template <typename scalar_t>
const scalar_t* data_of(const at::Tensor& tensor) {
  return static_cast<const scalar_t*>(tensor.const_data_ptr());
}

template <typename scalar_t>
scalar_t* mutable_data_of(const at::Tensor& tensor) {
  return static_cast<scalar_t*>(tensor.mutable_data_ptr());
}

// `tensor` if it is dense, else a contiguous copy: the norm then runs over the elements in
// memory order, or in index order for a tensor with gaps, in both operators alike.
at::Tensor dense(const at::Tensor& tensor) {
  return tensor.is_non_overlapping_and_dense() ? tensor : tensor.contiguous();
}

// `tensor` if it is laid out as `like` (a dense tensor), else a copy laid out so.
at::Tensor dense_like(const at::Tensor& tensor, const at::Tensor& like) {
  if (tensor.strides() == like.strides() && tensor.is_non_overlapping_and_dense()) {
    return tensor;
  }
  return at::empty_like(like).copy_(tensor);
}

void check_floating_cpu(const at::Tensor& tensor, const char* op, const char* name, size_t i) {
  TORCH_CHECK(
      tensor.device().is_cpu(), op, ": ", name, "[", i, "] is on ", tensor.device(), "; ", op,
      " has a CPU kernel only; CUDA tensors take the foreach path");
  TORCH_CHECK(
      tensor.layout() == at::kStrided, op, ": ", name, "[", i, "] is not dense (layout ",
      tensor.layout(), "); LARS needs dense tensors");
  TORCH_CHECK(
      at::isFloatingType(tensor.scalar_type()), op, ": ", name, "[", i, "] has dtype ",
      tensor.scalar_type(), "; only floating-point tensors (not complex or integer) are supported");
}

// `tensor` has the dtype and shape of params[i].
void check_matches(const at::Tensor& tensor, const at::Tensor& param, const char* name, size_t i) {
  check_floating_cpu(tensor, "lars_sgd_", name, i);
  TORCH_CHECK(
      tensor.scalar_type() == param.scalar_type() && tensor.sizes() == param.sizes(), "lars_sgd_: ",
      name, "[", i, "] (", tensor.scalar_type(), tensor.sizes(), ") does not match params[", i, "] (",
      param.scalar_type(), param.sizes(), ")");
}

// A one-element CPU tensor's value.
double cpu_scalar(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(
      tensor.device().is_cpu() && tensor.numel() == 1, "lars_sgd_: ", name,
      " must be a one-element CPU tensor, got ", tensor.numel(), " elements on ", tensor.device());
  return tensor.item<double>();
}

struct SgdOptions {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  double eps;
  double trust_coef;
  bool clip;
};

// w, g and buf of one tensor, laid out alike.
struct Slot {
  at::Tensor param;
  at::Tensor grad;
  at::Tensor momentum_buffer; // undefined without momentum
};

// The update of data[begin, end) of one tensor with trust ratio `ratio`; returns the sum of
// squares of the new weights as stored.
template <typename scalar_t>
at::opmath_type<scalar_t> update_chunk(
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
  SquareSum<scalar_t> new_param_square_sum;
  for (int64_t i = begin; i < end; i += kLanes) {
    const int64_t count = std::min(kLanes, end - i);
    Lanes<scalar_t> w = Lanes<scalar_t>::load(param + i, count);
    Lanes<scalar_t> d = Lanes<scalar_t>::load(grad + i, count);
    if (grad_scale != nullptr) {
      d = map(d, [&](const Vec& g) { return g / Vec(*grad_scale); });
    }
    if (options.maximize) {
      d = map(d, [](const Vec& g) { return g.neg(); });
    }
    if (options.weight_decay != 0) {
      d = map(d, w, [&](const Vec& g, const Vec& p) { return g + weight_decay * p; });
    }
    d = map(d, [&](const Vec& g) { return g * trust_ratio; });
    if (buf != nullptr) {
      Lanes<scalar_t> b = options.is_first_step
          ? d
          : map(Lanes<scalar_t>::load(buf + i, count), d, [&](const Vec& m, const Vec& g) {
              return m * momentum + g * one_minus_dampening;
            });
      b.store(buf + i, count);
      d = options.nesterov ? map(d, b, [&](const Vec& g, const Vec& m) { return g + m * momentum; }) : b;
    }
    w = map(w, d, [&](const Vec& p, const Vec& g) { return p - g * lr; });
    w.store(param + i, count);
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      w = Lanes<scalar_t>::load(param + i, count); // the norm of the rounded values
    }
    new_param_square_sum.add(w, count);
  }
  return new_param_square_sum.total();
}

template <typename scalar_t>
void lars_sgd_kernel(
    const std::vector<Slot>& slots,
    const at::Tensor& param_norms,
    const SgdOptions& options,
    const std::optional<double>& grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t scale = grad_scale ? static_cast<opmath_t>(*grad_scale) : 0;
  const opmath_t* scale_ptr = grad_scale ? &scale : nullptr;
  auto norms = param_norms.accessor<float, 1>();
  std::vector<int64_t> numels;
  for (const auto& slot : slots) {
    numels.push_back(slot.param.numel());
  }
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
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        partials[c] = chunk_square_sum(data_of<scalar_t>(slots[chunk.tensor].grad), chunk.begin, chunk.end, scale_ptr);
      }
    });
    std::vector<opmath_t> ratios(slots.size());
    for (size_t c = 0; c < chunks.size();) {
      const int64_t i = chunks[c].tensor;
      const size_t next = c + (numels[i] + kChunkNumel - 1) / kChunkNumel;
      const double grad_norm = norm_from_partials(partials, c, next);
      ratios[i] = static_cast<opmath_t>(trust_ratio(
          norms[i], grad_norm, options.weight_decay, options.lr, options.eps, options.trust_coef, options.clip));
      c = next;
    }
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        partials[c] = update_chunk<scalar_t>(
            slots[chunk.tensor], chunk.begin, chunk.end, ratios[chunk.tensor], options, scale_ptr);
      }
    });
    for (size_t c = 0; c < chunks.size();) {
      const int64_t i = chunks[c].tensor;
      const size_t next = c + (numels[i] + kChunkNumel - 1) / kChunkNumel;
      norms[i] = norm_from_partials(partials, c, next);
      c = next;
    }
    first = last;
  }
}

} // namespace

at::Tensor lars_param_norms(at::TensorList tensors) {
  at::Tensor norms = at::empty({static_cast<int64_t>(tensors.size())}, at::kFloat);
  if (tensors.empty()) {
    return norms;
  }
  std::vector<at::Tensor> dense_tensors;
  std::vector<int64_t> numels;
  for (const auto i : c10::irange(tensors.size())) {
    check_floating_cpu(tensors[i], "lars_param_norms", "tensors", i);
    TORCH_CHECK(
        tensors[i].scalar_type() == tensors[0].scalar_type(), "lars_param_norms: tensors[", i,
        "] has dtype ", tensors[i].scalar_type(), " but tensors[0] has ", tensors[0].scalar_type(),
        "; pass tensors of one dtype");
    dense_tensors.push_back(dense(tensors[i]));
    numels.push_back(tensors[i].numel());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, tensors[0].scalar_type(), "lars_param_norms", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<Chunk> chunks = chunks_of(numels, 0, static_cast<int64_t>(numels.size()));
    std::vector<opmath_t> partials(chunks.size());
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Chunk& chunk = chunks[c];
        partials[c] = chunk_square_sum<scalar_t>(
            data_of<scalar_t>(dense_tensors[chunk.tensor]), chunk.begin, chunk.end, nullptr);
      }
    });
    auto out = norms.accessor<float, 1>();
    size_t c = 0;
    for (const auto i : c10::irange(numels.size())) {
      const size_t next = c + (numels[i] + kChunkNumel - 1) / kChunkNumel;
      out[i] = norm_from_partials(partials, c, next);
      c = next;
    }
  });
  return norms;
}

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
    const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf) {
  // Every check before anything is written: a refused step modifies nothing.
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "lars_sgd_: got ", n, " params but ", grads.size(), " grads");
  TORCH_CHECK(
      momentum_buffers.size() == n || (momentum == 0 && momentum_buffers.empty()), "lars_sgd_: got ", n,
      " params but ", momentum_buffers.size(), " momentum_buffers (momentum=", momentum,
      "; pass one buffer per param, or none when momentum is 0)");
  TORCH_CHECK(
      param_norms.device().is_cpu() && param_norms.scalar_type() == at::kFloat && param_norms.dim() == 1 &&
          param_norms.size(0) == static_cast<int64_t>(n),
      "lars_sgd_: param_norms must be a 1-D fp32 CPU tensor of ", n, " norms, got ",
      param_norms.scalar_type(), param_norms.sizes(), " on ", param_norms.device());
  TORCH_CHECK(
      at::isFloatingType(lr.scalar_type()), "lars_sgd_: lr must be a floating-point tensor, got ",
      lr.scalar_type());
  for (const auto i : c10::irange(n)) {
    check_floating_cpu(params[i], "lars_sgd_", "params", i);
    TORCH_CHECK(
        params[i].scalar_type() == params[0].scalar_type(), "lars_sgd_: params[", i, "] has dtype ",
        params[i].scalar_type(), " but params[0] has ", params[0].scalar_type(), "; pass one dtype per call");
    check_matches(grads[i], params[i], "grads", i);
    if (momentum != 0) {
      check_matches(momentum_buffers[i], params[i], "momentum_buffers", i);
    }
  }
  const SgdOptions options{
      cpu_scalar(lr, "lr"), weight_decay, momentum, dampening, nesterov, maximize, is_first_step,
      eps, trust_coef, clip};
  const std::optional<double> scale =
      grad_scale ? std::optional<double>(cpu_scalar(*grad_scale, "grad_scale")) : std::nullopt;
  if (n == 0 || (found_inf && cpu_scalar(*found_inf, "found_inf") != 0)) {
    return;
  }

  // The kernel walks w, g and buf in the same memory order; tensors laid out otherwise are
  // updated in dense copies, written back afterwards.
  std::vector<Slot> slots;
  slots.reserve(n);
  for (const auto i : c10::irange(n)) {
    const at::Tensor param = dense(params[i]);
    slots.push_back({
        param,
        dense_like(grads[i], param),
        momentum != 0 ? dense_like(momentum_buffers[i], param) : at::Tensor()});
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "lars_sgd_", [&] {
    lars_sgd_kernel<scalar_t>(slots, param_norms, options, scale);
  });
  // Written in place, as by in-place ATen ops: their version counters say so (autograd, and
  // lars::LARS's test for a stale carried norm, rely on it).
  for (const auto i : c10::irange(n)) {
    if (slots[i].param.is_same(params[i])) {
      params[i].unsafeGetTensorImpl()->bump_version();
    } else {
      params[i].copy_(slots[i].param);
    }
    if (momentum != 0) {
      if (slots[i].momentum_buffer.is_same(momentum_buffers[i])) {
        momentum_buffers[i].unsafeGetTensorImpl()->bump_version();
      } else {
        momentum_buffers[i].copy_(slots[i].momentum_buffer);
      }
    }
  }
  param_norms.unsafeGetTensorImpl()->bump_version();
}

} // namespace lars
