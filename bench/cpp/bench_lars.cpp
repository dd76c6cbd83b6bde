// Step time of lars::LARS around torch::optim::SGD against the fastest SGD of libtorch,
// at::_fused_sgd_ (ATen's fused CPU kernel), over the same tensors: the parameter sets of
// bench/param_sets.py (ResNet-50: 161 tensors, 25,557,032 elements; a narrow transformer:
// 996 small tensors), fp32 and bf16.
//
// Paired and interleaved: every variant steps its own copy of the same parameters, and one
// benchmark iteration is one round in which each variant, in an order that rotates from
// round to round, gets fresh gradients (untimed) and then one timed step. The counters are
// medians over the rounds, with the interquartile range beside them (_q1, _q3), and the
// ratios are medians of the per-round ratios, so that the machine's slow and fast moments
// fall on both sides of a ratio alike. A summary table follows Google Benchmark's output.
//
// Variants:
//   sgd        torch::optim::SGD (libtorch's per-parameter loop)
//   fused_sgd  at::_fused_sgd_, the baseline: SGD in one pass, 5 passes over the set
//   lars       lars::LARS(SGD), the fused LARS-momentum operator (lars/fused.h), 7 passes
//   unfused    lars::LARS around a subclass of SGD, which takes the general path: LARS
//              scales .grad with multi-tensor ops, then libtorch's SGD steps
//
//     build/bench/bench_lars [--threads=N] [--clock=wall|thread] [--benchmark_filter=...]
//
// --threads sets at::set_num_threads; --clock=thread times each step in the CPU time of
// the calling thread (with --threads=1, a figure that another process on the machine
// disturbs less than wall time).

#include <lars/lars.h>

#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using Shape = std::vector<int64_t>;

constexpr double kLr = 0.01, kMomentum = 0.9, kWeightDecay = 1e-4;
constexpr double kEps = 1e-8, kTrustCoef = 1e-3;
constexpr int kWarmupRounds = 3;

bool thread_clock = false;

void add_batch_norm(std::vector<Shape>& shapes, int64_t channels) {
  shapes.push_back({channels}); // weight
  shapes.push_back({channels}); // bias
}

// torchvision's ResNet-50, in model.parameters() order (bench/param_sets.py, resnet50_shapes).
std::vector<Shape> resnet50_shapes() {
  std::vector<Shape> shapes{{64, 3, 7, 7}};
  add_batch_norm(shapes, 64);
  int64_t inplanes = 64;
  const std::pair<int64_t, int> stages[] = {{64, 3}, {128, 4}, {256, 6}, {512, 3}};
  for (const auto& [planes, blocks] : stages) {
    for (int block = 0; block < blocks; ++block) {
      const int64_t out = planes * 4;
      shapes.push_back({planes, inplanes, 1, 1});
      add_batch_norm(shapes, planes);
      shapes.push_back({planes, planes, 3, 3});
      add_batch_norm(shapes, planes);
      shapes.push_back({out, planes, 1, 1});
      add_batch_norm(shapes, out);
      if (block == 0) {
        shapes.push_back({out, inplanes, 1, 1});
        add_batch_norm(shapes, out);
      }
      inplanes = out;
    }
  }
  shapes.push_back({1000, 2048});
  shapes.push_back({1000});
  return shapes;
}

// A narrow 62-layer transformer (bench/param_sets.py, small_transformer_shapes).
std::vector<Shape> small_transformer_shapes() {
  constexpr int64_t width = 64, layers = 62, vocab = 1024, context = 256;
  std::vector<Shape> shapes{{vocab, width}, {context, width}};
  for (int64_t layer = 0; layer < layers; ++layer) {
    add_batch_norm(shapes, width); // layer norm 1 (same shapes as a batch norm)
    for (int projection = 0; projection < 4; ++projection) {
      shapes.push_back({width, width});
      shapes.push_back({width});
    }
    add_batch_norm(shapes, width); // layer norm 2
    shapes.push_back({4 * width, width});
    shapes.push_back({4 * width});
    shapes.push_back({width, 4 * width});
    shapes.push_back({width});
  }
  add_batch_norm(shapes, width); // final layer norm
  return shapes;
}

// The same parameters and gradients for every variant (seeded).
struct ParamSet {
  std::vector<torch::Tensor> params;
  std::vector<torch::Tensor> fresh_grads; // copied into .grad before every timed step

  ParamSet(const std::vector<Shape>& shapes, torch::Dtype dtype, torch::Device device) {
    torch::manual_seed(0);
    const auto options = torch::TensorOptions().dtype(dtype).device(device);
    for (const auto& shape : shapes) {
      int64_t fan_in = shape.size() > 1 ? 1 : shape[0];
      for (size_t i = 1; i < shape.size(); ++i) {
        fan_in *= shape[i];
      }
      auto param = (torch::randn(shape) / std::sqrt(static_cast<double>(fan_in))).to(options).requires_grad_();
      fresh_grads.push_back((torch::randn(shape) * 1e-3).to(options));
      param.mutable_grad() = fresh_grads.back().clone();
      params.push_back(param);
    }
  }

  void refresh_grads() {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad().copy_(fresh_grads[i]);
    }
  }
};

// torch::optim::SGD as a type of its own: lars::LARS then takes its general path (it fuses
// only around torch::optim::SGD itself).
struct UnfusedSGD : torch::optim::SGD {
  using torch::optim::SGD::SGD;
};

// One variant: its own copy of the parameters and a step.
struct Variant {
  std::string name;
  ParamSet set;
  std::function<void()> step;
};

std::shared_ptr<torch::optim::SGD> make_sgd(const std::vector<torch::Tensor>& params, bool unfused = false) {
  const auto options = torch::optim::SGDOptions(kLr).momentum(kMomentum).weight_decay(kWeightDecay);
  if (unfused) {
    return std::make_shared<UnfusedSGD>(params, options);
  }
  return std::make_shared<torch::optim::SGD>(params, options);
}

std::vector<std::unique_ptr<Variant>> make_variants(const std::vector<Shape>& shapes, torch::Dtype dtype,
                                                    torch::Device device) {
  std::vector<std::unique_ptr<Variant>> variants;
  auto add = [&](const std::string& name) {
    variants.push_back(std::make_unique<Variant>(Variant{name, ParamSet(shapes, dtype, device), {}}));
    return variants.back().get();
  };
  {
    Variant* v = add("sgd");
    auto sgd = make_sgd(v->set.params);
    v->step = [sgd] { sgd->step(); };
  }
  {
    Variant* v = add("fused_sgd");
    std::vector<torch::Tensor> grads;
    std::vector<torch::Tensor> buffers;
    for (const auto& param : v->set.params) {
      grads.push_back(param.grad());
      buffers.push_back(torch::zeros_like(param));
    }
    auto first = std::make_shared<bool>(true);
    v->step = [params = v->set.params, grads, buffers, first] {
      at::_fused_sgd_(params, grads, buffers, kWeightDecay, kMomentum, kLr, 0.0, false, false, *first);
      *first = false;
    };
  }
  for (const bool unfused : {false, true}) {
    Variant* v = add(unfused ? "unfused" : "lars");
    auto optimizer = std::make_shared<lars::LARS>(
        make_sgd(v->set.params, unfused), lars::LARSOptions().eps(kEps).trust_coef(kTrustCoef));
    v->step = [optimizer] { optimizer->step(); };
  }
  return variants;
}

double now_seconds() {
  if (thread_clock) {
    timespec time{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &time);
    return static_cast<double>(time.tv_sec) + 1e-9 * static_cast<double>(time.tv_nsec);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double quantile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double position = q * static_cast<double>(values.size() - 1);
  const auto below = static_cast<size_t>(std::floor(position));
  const size_t above = std::min(below + 1, values.size() - 1);
  return values[below] + (position - static_cast<double>(below)) * (values[above] - values[below]);
}

// Median and interquartile range of each series, for the summary table.
struct Summary {
  std::string benchmark;
  std::vector<std::pair<std::string, std::vector<double>>> series; // name -> samples (ms or ratio)
  int64_t bytes_per_pass;
};
std::vector<Summary> summaries;

void bench_round_robin(benchmark::State& state, const std::string& name, const std::vector<Shape>& shapes,
                       torch::Dtype dtype, torch::Device device) {
  auto variants = make_variants(shapes, dtype, device);
  auto synchronize = [&] {
    if (device.is_cuda()) {
      torch::cuda::synchronize();
    }
  };
  std::map<std::string, std::vector<double>> times_ms;
  auto round = [&](size_t rotation, bool timed) {
    for (size_t k = 0; k < variants.size(); ++k) {
      Variant& variant = *variants[(k + rotation) % variants.size()];
      variant.set.refresh_grads();
      synchronize();
      const double start = now_seconds();
      variant.step();
      synchronize();
      const double seconds = now_seconds() - start;
      if (timed) {
        times_ms[variant.name].push_back(1e3 * seconds);
      }
    }
  };
  for (int warmup = 0; warmup < kWarmupRounds; ++warmup) {
    round(warmup, false);
  }
  size_t rotation = 0;
  for (auto _ : state) {
    round(rotation++, true);
    state.SetIterationTime(times_ms["lars"].back() / 1e3); // the benchmark's time: the LARS step
  }
  int64_t numel = 0;
  for (const auto& param : variants.front()->set.params) {
    numel += param.numel();
  }
  Summary summary{name, {}, numel * static_cast<int64_t>(c10::elementSize(dtype))};
  for (const auto& variant : {"sgd", "fused_sgd", "lars", "unfused"}) {
    const auto& samples = times_ms[variant];
    state.counters[std::string(variant) + "_ms"] = quantile(samples, 0.5);
    state.counters[std::string(variant) + "_q1"] = quantile(samples, 0.25);
    state.counters[std::string(variant) + "_q3"] = quantile(samples, 0.75);
    summary.series.emplace_back(std::string(variant) + " ms", samples);
  }
  for (const auto& [numerator, denominator] : {std::pair{"lars", "fused_sgd"}, std::pair{"lars", "sgd"},
                                               std::pair{"unfused", "fused_sgd"}}) {
    std::vector<double> ratios;
    for (size_t i = 0; i < times_ms[numerator].size(); ++i) {
      ratios.push_back(times_ms[numerator][i] / times_ms[denominator][i]);
    }
    const std::string key = std::string(numerator) + "/" + denominator;
    state.counters[key] = quantile(ratios, 0.5);
    state.counters[key + "_q1"] = quantile(ratios, 0.25);
    state.counters[key + "_q3"] = quantile(ratios, 0.75);
    summary.series.emplace_back(key, ratios);
  }
  // The least traffic over the median step: 5 passes over the set for SGD, 7 for LARS.
  state.counters["fused_sgd_GBps"] = 5.0 * summary.bytes_per_pass / (1e6 * quantile(times_ms["fused_sgd"], 0.5));
  state.counters["lars_GBps"] = 7.0 * summary.bytes_per_pass / (1e6 * quantile(times_ms["lars"], 0.5));
  state.counters["tensors"] = static_cast<double>(shapes.size());
  summaries.push_back(std::move(summary));
}

void print_summary() {
  std::printf("\nMedians over the rounds [interquartile range]; ratios are medians of per-round ratios.\n");
  for (const auto& summary : summaries) {
    std::printf("\n%s (%.1f MB per pass over the parameters)\n", summary.benchmark.c_str(), summary.bytes_per_pass / 1e6);
    for (const auto& [name, samples] : summary.series) {
      std::printf("  %-20s %9.3f  [%.3f, %.3f]  (%zu rounds)\n", name.c_str(), quantile(samples, 0.5),
                  quantile(samples, 0.25), quantile(samples, 0.75), samples.size());
    }
  }
}

void register_benchmarks(int rounds) {
  const std::pair<const char*, std::vector<Shape>> sets[] = {
      {"resnet50", resnet50_shapes()}, {"small", small_transformer_shapes()}};
  const std::pair<const char*, torch::Dtype> dtypes[] = {{"fp32", torch::kFloat32}, {"bf16", torch::kBFloat16}};
  std::vector<torch::Device> devices{torch::kCPU};
  if (torch::cuda::is_available()) {
    devices.emplace_back(torch::kCUDA);
  }
  for (const auto& device : devices) {
    for (const auto& [set_name, shapes] : sets) {
      for (const auto& [dtype_name, dtype] : dtypes) {
        const std::string name =
            std::string(set_name) + "/" + dtype_name + "/" + (device.is_cuda() ? "cuda" : "cpu");
        benchmark::RegisterBenchmark(name.c_str(), bench_round_robin, name, shapes, dtype, device)
            ->Unit(benchmark::kMillisecond)
            ->UseManualTime()
            ->Iterations(rounds);
      }
    }
  }
}

// Takes --name=value out of argv (Google Benchmark refuses flags it does not know).
std::string take_flag(int& argc, char** argv, const std::string& name, const std::string& fallback) {
  const std::string prefix = "--" + name + "=";
  std::string value = fallback;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) {
      value = argv[i] + prefix.size();
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  return value;
}

} // namespace

int main(int argc, char** argv) {
  const int threads = std::stoi(take_flag(argc, argv, "threads", "0"));
  const int rounds = std::stoi(take_flag(argc, argv, "rounds", "30"));
  thread_clock = take_flag(argc, argv, "clock", "wall") == "thread";
  if (threads > 0) {
    at::set_num_threads(threads);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    return 1;
  }
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("clock", thread_clock ? "thread CPU time" : "wall");
  benchmark::AddCustomContext("rounds", std::to_string(rounds));
  register_benchmarks(rounds);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_summary();
  return 0;
}
