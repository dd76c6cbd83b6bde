// Trains the Python demo's 1-D CNN (python/torchlars/demo/train.py) on MNIST-1D with
// lars::LARS around SGD at a large batch, biases and norms excluded, and prints the test
// accuracy after every epoch. Each step mirrors the Python demo's, name for name. The data set
// comes from the Python demo, as a torch.save file that torch::jit::pickle_load reads:
//
//     python -m torchlars.demo --export-data mnist1d.pt
//     train_mnist1d mnist1d.pt                      # batch 8192, the demo's LARS setting
//
// Exits with 1 if the best test accuracy is below --min-accuracy (ctest uses this).

#include <lars/lars.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/nn.h>
#include <torch/optim/sgd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// The Python demo's defaults (DemoConfig and train_run), for its LARS rows.
struct Settings {
  std::string data_path;
  int64_t batch_size = 8192;
  int64_t epochs = 20;
  double lr = 5.0;  // peak base LR, reached at the end of warm-up
  double trust_coef = 0.01;
  double warmup_epochs = 2.0;
  double weight_decay = 5e-4;
  double momentum = 0.9;
  uint64_t seed = 0;
  int threads = 0;  // 0: half the hardware threads, 1 to 4, as the Python demo
  double min_accuracy = 0.0;
  int64_t precise_bn_samples = 5000;
  int64_t eval_batch_size = 4096;
};

const char* const kUsage =
    "usage: train_mnist1d DATA.pt [--batch-size 8192] [--epochs 20] [--lr 5] [--trust-coef 0.01]\n"
    "                     [--warmup-epochs 2] [--weight-decay 5e-4] [--momentum 0.9] [--seed 0]\n"
    "                     [--threads N] [--min-accuracy 0]\n"
    "DATA.pt: written by `python -m torchlars.demo --export-data DATA.pt`\n";

Settings parse_args(int argc, char** argv) {
  Settings settings;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      settings.data_path = arg;
      continue;
    }
    if (i + 1 == argc) {
      throw std::invalid_argument(arg + " needs a value\n" + kUsage);
    }
    const std::string value = argv[++i];
    if (arg == "--batch-size") {
      settings.batch_size = std::stoll(value);
    } else if (arg == "--epochs") {
      settings.epochs = std::stoll(value);
    } else if (arg == "--lr") {
      settings.lr = std::stod(value);
    } else if (arg == "--trust-coef") {
      settings.trust_coef = std::stod(value);
    } else if (arg == "--warmup-epochs") {
      settings.warmup_epochs = std::stod(value);
    } else if (arg == "--weight-decay") {
      settings.weight_decay = std::stod(value);
    } else if (arg == "--momentum") {
      settings.momentum = std::stod(value);
    } else if (arg == "--seed") {
      settings.seed = std::stoull(value);
    } else if (arg == "--threads") {
      settings.threads = std::stoi(value);
    } else if (arg == "--min-accuracy") {
      settings.min_accuracy = std::stod(value);
    } else {
      throw std::invalid_argument("unknown option " + arg + "\n" + kUsage);
    }
  }
  if (settings.data_path.empty()) {
    throw std::invalid_argument(std::string("no data set given\n") + kUsage);
  }
  return settings;
}

struct MNIST1D {
  torch::Tensor x_train, y_train, x_test, y_test;  // x: (n, 1, 40) float, y: (n,) int64
};

MNIST1D load_mnist1d(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error(
        "cannot read " + path + "; write it with `python -m torchlars.demo --export-data " + path + "`");
  }
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  const auto tensors = torch::jit::pickle_load(bytes).toGenericDict();
  const auto get = [&](const char* key) { return tensors.at(key).toTensor(); };
  return {get("x_train"), get("y_train"), get("x_test"), get("y_test")};
}

/// Three strided conv-BN-ReLU blocks and a linear classifier, for inputs (n, 1, 40).
torch::nn::Sequential make_model(int64_t num_classes = 10, int64_t width = 16) {
  torch::nn::Sequential model;
  const auto block = [&](int64_t c_in, int64_t c_out, int64_t kernel_size) {
    model->push_back(torch::nn::Conv1d(
        torch::nn::Conv1dOptions(c_in, c_out, kernel_size).stride(2).padding(kernel_size / 2).bias(false)));
    model->push_back(torch::nn::BatchNorm1d(c_out));
    model->push_back(torch::nn::ReLU(torch::nn::ReLUOptions(/*inplace=*/true)));
  };
  block(1, width, 5);              // length 40 -> 20
  block(width, 2 * width, 3);      // -> 10
  block(2 * width, 4 * width, 3);  // -> 5
  model->push_back(torch::nn::Flatten());
  model->push_back(torch::nn::Linear(4 * width * 5, num_classes));
  return model;
}

/// torchlars.exclude_bias_and_norm: weights (adapted by LARS, with weight decay) in group 0;
/// biases and norm parameters (ndim <= 1: no weight decay, no trust ratio) in group 1.
std::unique_ptr<lars::LARS> make_optimizer(torch::nn::Module& model, const Settings& settings) {
  std::vector<torch::Tensor> adapted;
  std::vector<torch::Tensor> excluded;
  for (const auto& param : model.parameters()) {
    (param.dim() <= 1 ? excluded : adapted).push_back(param);
  }
  const auto sgd_options = torch::optim::SGDOptions(settings.lr).momentum(settings.momentum);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(adapted, std::make_unique<torch::optim::SGDOptions>(
                                   torch::optim::SGDOptions(sgd_options).weight_decay(settings.weight_decay)));
  groups.emplace_back(excluded, std::make_unique<torch::optim::SGDOptions>(sgd_options));
  auto sgd = std::make_shared<torch::optim::SGD>(groups, sgd_options);
  return std::make_unique<lars::LARS>(
      sgd, lars::LARSOptions().trust_coef(settings.trust_coef).excluded_param_groups({1}));
}

/// LR multiplier: linear warm-up to 1, then polynomial decay to 0 at total_steps.
double warmup_poly_schedule(int64_t step, int64_t warmup_steps, int64_t total_steps, double power = 2.0) {
  if (step < warmup_steps) {
    return static_cast<double>(step + 1) / warmup_steps;
  }
  const double progress = static_cast<double>(step - warmup_steps) / std::max<int64_t>(1, total_steps - warmup_steps);
  return std::pow(std::max(0.0, 1.0 - progress), power);
}

/// Sets BatchNorm's running statistics to their exact average over x ("precise BN"): at 8K a
/// run takes few steps per epoch, and momentum-0.1 running averages would lag the weights.
void recalibrate_batch_norm(torch::nn::Sequential& model, const torch::Tensor& x, int64_t batch_size) {
  torch::NoGradGuard no_grad;
  std::vector<torch::nn::BatchNorm1dImpl*> norms;
  for (const auto& module : model->modules(/*include_self=*/false)) {
    if (auto* norm = module->as<torch::nn::BatchNorm1d>()) {
      norms.push_back(norm);
    }
  }
  std::vector<std::optional<double>> momenta;
  for (auto* norm : norms) {
    momenta.push_back(norm->options.momentum());
    norm->reset_running_stats();
    norm->options.momentum(std::nullopt);  // cumulative average
  }
  model->train();
  for (int64_t i = 0; i < x.size(0); i += batch_size) {
    model->forward(x.slice(0, i, i + batch_size));
  }
  for (size_t i = 0; i < norms.size(); ++i) {
    norms[i]->options.momentum(momenta[i]);
  }
}

double evaluate(torch::nn::Sequential& model, const torch::Tensor& x, const torch::Tensor& y, int64_t batch_size) {
  torch::NoGradGuard no_grad;
  model->eval();
  int64_t correct = 0;
  for (int64_t i = 0; i < x.size(0); i += batch_size) {
    const auto predicted = model->forward(x.slice(0, i, i + batch_size)).argmax(1);
    correct += predicted.eq(y.slice(0, i, i + batch_size)).sum().item<int64_t>();
  }
  return static_cast<double>(correct) / x.size(0);
}

int default_threads() {
  const int hardware = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(4, hardware / 2));
}

int train(const Settings& settings) {
  torch::set_num_threads(settings.threads > 0 ? settings.threads : default_threads());
  const auto data = load_mnist1d(settings.data_path);
  const int64_t num_train = data.x_train.size(0);
  const int64_t steps_per_epoch = num_train / settings.batch_size;  // drop the last partial batch
  if (steps_per_epoch == 0) {
    throw std::invalid_argument(
        "batch size " + std::to_string(settings.batch_size) + " exceeds the " + std::to_string(num_train) +
        " training samples");
  }
  const int64_t total_steps = settings.epochs * steps_per_epoch;
  const int64_t warmup_steps = std::max<int64_t>(1, std::llround(settings.warmup_epochs * steps_per_epoch));
  std::printf(
      "MNIST-1D: %lld train, %lld test; LARS(SGD) batch %lld, LR %g, trust_coef %g, %lld epochs, %lld steps\n",
      static_cast<long long>(num_train), static_cast<long long>(data.x_test.size(0)),
      static_cast<long long>(settings.batch_size), settings.lr, settings.trust_coef,
      static_cast<long long>(settings.epochs), static_cast<long long>(total_steps));

  torch::manual_seed(settings.seed);
  auto model = make_model();
  auto optimizer = make_optimizer(*model, settings);
  auto generator = at::detail::createCPUGenerator(settings.seed);
  double best_accuracy = 0.0;
  int64_t step = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t epoch = 1; epoch <= settings.epochs; ++epoch) {
    model->train();
    const auto order = torch::randperm(num_train, generator);
    double loss_sum = 0.0;
    for (int64_t i = 0; i < steps_per_epoch; ++i, ++step) {
      const double factor = warmup_poly_schedule(step, warmup_steps, total_steps);
      for (auto& group : optimizer->param_groups()) {
        group.options().set_lr(settings.lr * factor);
      }
      const auto batch = order.slice(0, i * settings.batch_size, (i + 1) * settings.batch_size);
      const auto loss = torch::nn::functional::cross_entropy(
          model->forward(data.x_train.index_select(0, batch)), data.y_train.index_select(0, batch));
      optimizer->zero_grad();
      loss.backward();
      optimizer->step();
      loss_sum += loss.item<double>();
    }
    recalibrate_batch_norm(
        model, data.x_train.index_select(0, order.slice(0, 0, settings.precise_bn_samples)),
        settings.eval_batch_size);
    const double accuracy = evaluate(model, data.x_test, data.y_test, settings.eval_batch_size);
    best_accuracy = std::max(best_accuracy, accuracy);
    const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
    std::printf(
        "epoch %3lld  train loss %.4f  test top-1 %5.1f%%  (%.0f s)\n", static_cast<long long>(epoch),
        loss_sum / steps_per_epoch, 100 * accuracy, elapsed.count());
    std::fflush(stdout);
  }
  std::printf("best test top-1 %.1f%%\n", 100 * best_accuracy);
  if (best_accuracy < settings.min_accuracy) {
    std::printf("below --min-accuracy %.1f%%\n", 100 * settings.min_accuracy);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return train(parse_args(argc, argv));
  } catch (const std::exception& error) {
    std::fprintf(stderr, "train_mnist1d: %s\n", error.what());
    return 2;
  }
}
