// Step time of lars::LARS around torch::optim::SGD against torch::optim::SGD alone, on the
// parameter sets of bench/param_sets.py (ResNet-50: 161 tensors, 25,557,032 elements; a
// narrow transformer: 996 small tensors), fp32 and bf16, on CPU and, when libtorch has it,
// CUDA. The bytes/s counter is the least traffic over the step time: 5 passes over the
// parameter set for SGD (read w, g, m; write w, m), 7 for LARS (plus reading w and g for
// the norms).
//
//     build/bench/bench_lars --benchmark_min_time=0.5s

#include <lars/lars.h>

#include <benchmark/benchmark.h>
#include <torch/cuda.h>
#include <torch/optim/sgd.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace {

using Shape = std::vector<int64_t>;

constexpr double kLr = 0.01, kMomentum = 0.9, kWeightDecay = 1e-4;
constexpr double kEps = 1e-8, kTrustCoef = 1e-3;

void add_batch_norm(std::vector<Shape>& shapes, int64_t channels) {
  shapes.push_back({channels});  // weight
  shapes.push_back({channels});  // bias
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
    add_batch_norm(shapes, width);  // layer norm 1 (same shapes as a batch norm)
    for (int projection = 0; projection < 4; ++projection) {
      shapes.push_back({width, width});
      shapes.push_back({width});
    }
    add_batch_norm(shapes, width);  // layer norm 2
    shapes.push_back({4 * width, width});
    shapes.push_back({4 * width});
    shapes.push_back({width, 4 * width});
    shapes.push_back({width});
  }
  add_batch_norm(shapes, width);  // final layer norm
  return shapes;
}

std::vector<torch::Tensor> make_params(const std::vector<Shape>& shapes, torch::Dtype dtype, torch::Device device) {
  torch::manual_seed(0);
  std::vector<torch::Tensor> params;
  params.reserve(shapes.size());
  for (const auto& shape : shapes) {
    int64_t fan_in = shape.size() > 1 ? 1 : shape[0];
    for (size_t i = 1; i < shape.size(); ++i) {
      fan_in *= shape[i];
    }
    auto options = torch::TensorOptions().dtype(dtype).device(device);
    auto param = (torch::randn(shape) / std::sqrt(static_cast<double>(fan_in))).to(options).requires_grad_();
    param.mutable_grad() = (torch::randn(shape) * 1e-3).to(options);
    params.push_back(param);
  }
  return params;
}

std::shared_ptr<torch::optim::SGD> make_sgd(const std::vector<torch::Tensor>& params) {
  return std::make_shared<torch::optim::SGD>(
      params, torch::optim::SGDOptions(kLr).momentum(kMomentum).weight_decay(kWeightDecay));
}

void bench_step(benchmark::State& state, const std::vector<Shape>& shapes, torch::Dtype dtype,
                torch::Device device, bool lars) {
  torch::NoGradGuard no_grad;
  auto params = make_params(shapes, dtype, device);
  auto sgd = make_sgd(params);
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  if (lars) {
    optimizer = std::make_unique<lars::LARS>(sgd, lars::LARSOptions().eps(kEps).trust_coef(kTrustCoef));
  }
  const std::function<void()> step = [&] { lars ? optimizer->step() : sgd->step(); };
  for (int warmup = 0; warmup < 3; ++warmup) {
    step();
  }
  if (device.is_cuda()) {
    torch::cuda::synchronize();
  }
  for (auto _ : state) {
    step();
    if (device.is_cuda()) {
      torch::cuda::synchronize();  // time the device work, not the launches
    }
  }
  int64_t numel = 0;
  for (const auto& param : params) {
    numel += param.numel();
  }
  const int64_t passes = lars ? 7 : 5;
  state.SetBytesProcessed(state.iterations() * passes * numel * static_cast<int64_t>(c10::elementSize(dtype)));
  state.counters["tensors"] = static_cast<double>(params.size());
}

void register_benchmarks() {
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
        for (const bool lars : {false, true}) {
          const std::string name = std::string(lars ? "LARS(SGD)" : "SGD") + "/" + set_name + "/" + dtype_name +
              "/" + (device.is_cuda() ? "cuda" : "cpu");
          benchmark::RegisterBenchmark(name.c_str(), bench_step, shapes, dtype, device, lars)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
        }
      }
    }
  }
}

} // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) {
    return 1;
  }
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
