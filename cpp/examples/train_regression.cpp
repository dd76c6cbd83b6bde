// Trains a small MLP with lars::LARS over SGD on generated data and prints the loss as it
// falls. Weights are adapted by LARS; biases go to an excluded param group, as large-batch
// recipes do. Exits with 1 if training did not reduce the loss.

#include <lars/lars.h>

#include <torch/nn.h>
#include <torch/optim/sgd.h>

#include <cstdio>
#include <memory>
#include <vector>

int main() {
  torch::manual_seed(0);

  // y = sin(3 x0) + x1 * x2, on 512 points.
  const auto x = torch::rand({512, 3}) * 2 - 1;
  const auto y = (torch::sin(3 * x.select(1, 0)) + x.select(1, 1) * x.select(1, 2)).unsqueeze(1);

  torch::nn::Sequential model(
      torch::nn::Linear(3, 32), torch::nn::Tanh(), torch::nn::Linear(32, 32), torch::nn::Tanh(),
      torch::nn::Linear(32, 1));

  std::vector<torch::Tensor> weights;
  std::vector<torch::Tensor> biases;
  for (const auto& param : model->named_parameters()) {
    (param.value().dim() > 1 ? weights : biases).push_back(param.value());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(weights, std::make_unique<torch::optim::SGDOptions>(
                                   torch::optim::SGDOptions(20.0).momentum(0.9).weight_decay(1e-4)));
  groups.emplace_back(biases); // takes the defaults: no weight decay
  auto sgd = std::make_shared<torch::optim::SGD>(groups, torch::optim::SGDOptions(0.05).momentum(0.9));
  lars::LARS optimizer(
      sgd, lars::LARSOptions().trust_coef(1e-3).eps(1e-8).excluded_param_groups({1}));

  double first_loss = 0;
  double last_loss = 0;
  for (int epoch = 0; epoch <= 200; ++epoch) {
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(model->forward(x), y);
    loss.backward();
    optimizer.step();
    last_loss = loss.item<double>();
    if (epoch == 0) {
      first_loss = last_loss;
    }
    if (epoch % 40 == 0) {
      std::printf("epoch %3d  loss %.5f\n", epoch, last_loss);
    }
  }
  if (!(last_loss < first_loss / 4)) {
    std::printf("the loss did not fall: %.5f -> %.5f\n", first_loss, last_loss);
    return 1;
  }
  return 0;
}
