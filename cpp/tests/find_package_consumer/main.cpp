// One LARS step over SGD and one LAMB step through the installed liblars; prints the
// parameters they updated, one line each.

#include <lars/lamb.h>
#include <lars/lars.h>

#include <torch/optim/sgd.h>

#include <iostream>
#include <memory>
#include <vector>

int main() {
  const auto w = torch::tensor({3.0, 4.0}).requires_grad_(true);
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<torch::Tensor>{w}, torch::optim::SGDOptions(1.0));
  lars::LARS optimizer(sgd, lars::LARSOptions().trust_coef(0.1).eps(0.0));
  w.mutable_grad() = torch::tensor({0.0, 10.0});
  optimizer.step();
  std::cout << w[0].item<double>() << " " << w[1].item<double>() << std::endl;

  const auto v = torch::tensor({3.0, 4.0}).requires_grad_(true);
  lars::LAMB lamb(std::vector<torch::Tensor>{v}, lars::LAMBOptions(0.1).weight_decay(0.01));
  v.mutable_grad() = torch::tensor({0.0, 10.0});
  lamb.step();
  std::cout << v[0].item<double>() << " " << v[1].item<double>() << std::endl;
  return 0;
}
