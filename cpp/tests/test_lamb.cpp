// lars::LAMB and the fused LAMB operator (lars/fused.h's lamb_), against an independent
// per-parameter reference in plain ATen ops: fp32 and fp64 tight, bf16 to rounding; its
// archive loaded by a plain torch::optim::AdamW; found_inf; refusals.

#include <lars/fused.h>
#include <lars/lamb.h>

#include "test_helpers.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <torch/serialize.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using lars::LAMBOptions;
using lars_test::contains;
using lars_test::error_of;

// Several chunks of the kernel (2**14 elements) and sizes that are not a whole number of its
// lanes; a matrix and a vector.
const std::vector<std::vector<int64_t>> kShapes = {{130, 129}, {37}, {5, 3}};

// One parameter of the reference: LAMB as You et al. (2019) and timm write it, in fp64.
struct ReferenceParam {
  at::Tensor w, m, v;
  int64_t step = 0;

  explicit ReferenceParam(const at::Tensor& init)
      : w(init.to(at::kDouble)), m(at::zeros_like(w)), v(at::zeros_like(w)) {}

  void step_on(at::Tensor g, const LAMBOptions& o, bool adapt, double grad_divisor = 1.0) {
    const auto [beta1, beta2] = o.betas();
    g = g.to(at::kDouble) / grad_divisor;
    if (o.maximize()) {
      g = -g;
    }
    ++step;
    m = beta1 * m + (1 - beta1) * g;
    v = beta2 * v + (1 - beta2) * g * g;
    const double bc1 = o.bias_correction() ? 1 - std::pow(beta1, step) : 1.0;
    const double bc2 = o.bias_correction() ? 1 - std::pow(beta2, step) : 1.0;
    const at::Tensor u = (m / bc1) / (at::sqrt(v / bc2) + o.eps()) + o.weight_decay() * w;
    const double w_norm = w.norm().item<double>();
    const double u_norm = u.norm().item<double>();
    double r = w_norm > 0 && u_norm > 0 ? o.trust_coef() * w_norm / (u_norm + o.trust_eps()) : 1.0;
    if (o.trust_clip()) {
      r = std::min(r, 1.0);
    }
    if (!adapt) {
      r = 1.0;
    }
    w = w - o.lr() * r * u;
  }
};

std::vector<at::Tensor> draw_params(at::ScalarType dtype) {
  std::vector<at::Tensor> params;
  for (const auto& shape : kShapes) {
    params.push_back((at::randn(shape) * 3).to(dtype).requires_grad_(true)); // ratios well away from 1
  }
  return params;
}

void set_grad(const at::Tensor& param, const at::Tensor& grad) {
  // A copy: an adapted fp32/fp64 step leaves its update u in the gradient.
  param.mutable_grad() = grad.to(param.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
}

// max |a - b| / max |b|.
double relative_error(const at::Tensor& a, const at::Tensor& b) {
  const auto b64 = b.to(at::kDouble);
  return ((a.to(at::kDouble) - b64).abs().max() / b64.abs().max()).item<double>();
}

struct Case {
  const char* name;
  LAMBOptions options;
};

std::vector<Case> cases() {
  const auto base = LAMBOptions(0.01).weight_decay(0.02);
  return {
      {"default", base},
      {"trust_clip", LAMBOptions(base).trust_clip(true)},
      {"no_bias_correction", LAMBOptions(base).bias_correction(false)},
      {"maximize", LAMBOptions(base).maximize(true)},
      {"trust_coef_and_eps", LAMBOptions(base).trust_coef(0.5).trust_eps(1e-3).betas(std::make_tuple(0.8, 0.99))},
      {"no_decay_not_adapted", LAMBOptions(base).weight_decay(0)},
      {"no_decay_always_adapt", LAMBOptions(base).weight_decay(0).always_adapt(true)},
      {"max_grad_norm", LAMBOptions(base).max_grad_norm(0.5)},
  };
}

// `steps` steps of lars::LAMB and of the reference from the same parameters and gradients;
// the largest relative error of a parameter.
double lamb_against_reference(const LAMBOptions& options, at::ScalarType dtype, int steps) {
  auto params = draw_params(dtype);
  std::vector<ReferenceParam> reference;
  for (const auto& param : params) {
    reference.emplace_back(param.detach());
  }
  lars::LAMB optimizer(params, options);
  const bool adapt = options.weight_decay() != 0 || options.always_adapt();
  for (int step = 0; step < steps; ++step) {
    std::vector<at::Tensor> grads;
    double global_norm_squared = 0;
    for (const auto& param : params) {
      grads.push_back((at::randn(param.sizes()) * 0.1).to(dtype));
      global_norm_squared += grads.back().to(at::kDouble).pow(2).sum().item<double>();
    }
    const double divisor =
        options.max_grad_norm() ? std::max(std::sqrt(global_norm_squared) / *options.max_grad_norm(), 1.0) : 1.0;
    for (const auto i : c10::irange(params.size())) {
      set_grad(params[i], grads[i]);
      reference[i].step_on(grads[i], options, adapt, divisor);
    }
    optimizer.step();
  }
  double error = 0;
  for (const auto i : c10::irange(params.size())) {
    error = std::max(error, relative_error(params[i].detach(), reference[i].w));
  }
  return error;
}

TEST(LAMB, Fp64MatchesTheReference) {
  for (const auto& c : cases()) {
    EXPECT_LE(lamb_against_reference(c.options, at::kDouble, 5), 1e-13) << c.name;
  }
}

TEST(LAMB, Fp32MatchesTheReference) {
  for (const auto& c : cases()) {
    EXPECT_LE(lamb_against_reference(c.options, at::kFloat, 5), 2e-6) << c.name;
  }
}

TEST(LAMB, Bf16MatchesTheReferenceToRounding) {
  // One step: the reference starts from the same bf16 values, and the kernel's only roundings
  // are bf16's (the moments and the weights), at 2**-8 of the weights' scale.
  for (const auto& c : cases()) {
    EXPECT_LE(lamb_against_reference(c.options, at::kBFloat16, 1), 1e-2) << c.name;
  }
}

TEST(LAMB, ANoDecayGroupStepsAsAdamW) {
  const auto init = at::randn({40, 3});
  auto lamb_w = init.clone().requires_grad_(true);
  auto adamw_w = init.clone().requires_grad_(true);
  lars::LAMB lamb({lamb_w}, LAMBOptions(0.01).weight_decay(0).eps(1e-6));
  torch::optim::AdamW adamw({adamw_w}, torch::optim::AdamWOptions(0.01).weight_decay(0).eps(1e-6));
  for (int step = 0; step < 5; ++step) {
    const auto g = at::randn({40, 3});
    set_grad(lamb_w, g);
    set_grad(adamw_w, g);
    lamb.step();
    adamw.step();
  }
  EXPECT_LE(relative_error(lamb_w.detach(), adamw_w.detach()), 1e-6);
  EXPECT_TRUE(lamb.trust_ratios().empty()); // not adapted: no ratios
}

TEST(LAMB, AnAdaptedFp32StepLeavesItsUpdateInTheGradient) {
  const auto init = at::randn({300, 70}); // several chunks of the kernel
  auto w = init.clone().requires_grad_(true);
  lars::LAMB lamb({w}, LAMBOptions(0.01).weight_decay(0.02).eps(1e-6));
  set_grad(w, at::randn({300, 70}) * 0.1);
  lamb.step();
  const auto& state = static_cast<torch::optim::AdamWParamState&>(*lamb.state().at(w.unsafeGetTensorImpl()));
  // u = m_hat / (sqrt(v_hat) + eps) + wd * w, of the weights before the step (step 1).
  const auto u = (state.exp_avg() / 0.1) / ((state.exp_avg_sq() / 0.001).sqrt() + 1e-6) + 0.02 * init;
  EXPECT_LE(relative_error(w.grad(), u), 1e-6);
}

TEST(LAMB, ArchiveLoadsIntoAPlainAdamW) {
  auto params = draw_params(at::kFloat);
  lars::LAMB lamb(params, LAMBOptions(0.01).weight_decay(0.02).trust_clip(true));
  for (int step = 0; step < 3; ++step) {
    for (const auto& param : params) {
      set_grad(param, at::randn(param.sizes()));
    }
    lamb.step();
  }
  std::stringstream bytes;
  torch::save(lamb, bytes);
  torch::optim::AdamW adamw(params, torch::optim::AdamWOptions(1.0));
  torch::load(adamw, bytes);
  const auto& adamw_options = static_cast<const torch::optim::AdamWOptions&>(adamw.param_groups()[0].options());
  EXPECT_EQ(adamw_options.lr(), 0.01);
  EXPECT_EQ(adamw_options.weight_decay(), 0.02);
  EXPECT_EQ(adamw_options.eps(), 1e-6);
  for (const auto& param : params) {
    const auto& loaded = static_cast<torch::optim::AdamWParamState&>(*adamw.state().at(param.unsafeGetTensorImpl()));
    const auto& saved = static_cast<torch::optim::AdamWParamState&>(*lamb.state().at(param.unsafeGetTensorImpl()));
    EXPECT_EQ(loaded.step(), 3);
    EXPECT_TRUE(at::equal(loaded.exp_avg(), saved.exp_avg()));
    EXPECT_TRUE(at::equal(loaded.exp_avg_sq(), saved.exp_avg_sq()));
  }
  // And back: a LAMB loads its own archive, options included.
  std::stringstream again;
  torch::save(lamb, again);
  lars::LAMB reloaded(params, LAMBOptions(1.0));
  torch::load(reloaded, again);
  EXPECT_TRUE(static_cast<const LAMBOptions&>(reloaded.param_groups()[0].options()) ==
              static_cast<const LAMBOptions&>(lamb.param_groups()[0].options()));
}

// The operator on copies of `params`, with `found_inf` and `grad_scale`.
struct OperatorStep {
  std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
  explicit OperatorStep(at::ScalarType dtype) {
    for (const auto& shape : kShapes) {
      params.push_back(at::randn(shape).to(dtype));
      grads.push_back(at::randn(shape).to(dtype));
      exp_avgs.push_back(at::randn(shape).to(dtype) * 0.1);
      exp_avg_sqs.push_back(at::rand(shape).to(dtype));
      steps.push_back(at::scalar_tensor(3.0, at::kFloat));
    }
  }
  at::Tensor run(const std::optional<at::Tensor>& grad_scale = std::nullopt,
                 const std::optional<at::Tensor>& found_inf = std::nullopt) {
    return lars::lamb_(params, grads, exp_avgs, exp_avg_sqs, steps, LAMBOptions(0.01), true, grad_scale, found_inf);
  }
  std::vector<at::Tensor> written() const {
    std::vector<at::Tensor> all;
    for (const auto& list : {params, exp_avgs, exp_avg_sqs}) {
      for (const auto& t : list) {
        all.push_back(t.clone());
      }
    }
    return all;
  }
};

TEST(FusedLAMB, FoundInfSkipsTheStepAndGradScaleUnscales) {
  OperatorStep skipped(at::kFloat);
  const auto before = skipped.written();
  const auto ratios = skipped.run(at::scalar_tensor(4.0), at::scalar_tensor(1.0));
  const auto after = skipped.written();
  for (const auto i : c10::irange(before.size())) {
    EXPECT_TRUE(at::equal(before[i], after[i]));
  }
  EXPECT_TRUE(at::isnan(ratios).all().item<bool>());

  at::manual_seed(1);
  OperatorStep scaled(at::kFloat);
  at::manual_seed(1);
  OperatorStep unscaled(at::kFloat);
  for (auto& grad : scaled.grads) {
    grad.mul_(4.0);
  }
  scaled.run(at::scalar_tensor(4.0), at::scalar_tensor(0.0));
  unscaled.run();
  for (const auto i : c10::irange(kShapes.size())) {
    EXPECT_LE(relative_error(scaled.params[i], unscaled.params[i]), 1e-6);
  }
}

TEST(FusedLAMB, RatiosAreFp64ForFp64Params) {
  OperatorStep fp64(at::kDouble);
  EXPECT_EQ(fp64.run().scalar_type(), at::kDouble);
  OperatorStep fp32(at::kFloat);
  const auto ratios = fp32.run();
  EXPECT_EQ(ratios.scalar_type(), at::kFloat);
  EXPECT_EQ(ratios.size(0), static_cast<int64_t>(kShapes.size()));
}

TEST(FusedLAMB, TensorsLaidOutDifferentlyGiveTheSameNumbers) {
  OperatorStep contiguous(at::kFloat);
  OperatorStep transposed(at::kFloat);
  for (auto* list : {&transposed.params, &transposed.grads, &transposed.exp_avgs, &transposed.exp_avg_sqs}) {
    for (auto& t : *list) {
      t = t.dim() == 2 ? t.t().contiguous().t() : t; // same values, column-major
    }
  }
  for (const auto i : c10::irange(kShapes.size())) {
    transposed.params[i].copy_(contiguous.params[i]);
    transposed.grads[i].copy_(contiguous.grads[i]);
    transposed.exp_avgs[i].copy_(contiguous.exp_avgs[i]);
    transposed.exp_avg_sqs[i].copy_(contiguous.exp_avg_sqs[i]);
  }
  contiguous.run();
  transposed.run();
  for (const auto i : c10::irange(kShapes.size())) {
    EXPECT_LE(relative_error(transposed.params[i], contiguous.params[i]), 1e-6);
    EXPECT_LE(relative_error(transposed.exp_avg_sqs[i], contiguous.exp_avg_sqs[i]), 1e-6);
  }
}

TEST(FusedLAMB, BadInputIsRefusedWithNothingModified) {
  OperatorStep step(at::kFloat);
  const auto before = step.written();
  step.grads[1] = at::randn({38});
  EXPECT_TRUE(contains(error_of<c10::Error>([&] { step.run(); }), "lamb_: grads[1]"));
  step.grads[1] = at::randn({37}).to(at::kLong);
  EXPECT_TRUE(contains(error_of<c10::Error>([&] { step.run(); }), "has dtype Long"));
  step.grads[1] = at::randn({37});
  step.steps.pop_back();
  EXPECT_TRUE(contains(error_of<c10::Error>([&] { step.run(); }), "state_steps"));
  const auto after = step.written();
  for (const auto i : c10::irange(before.size())) {
    EXPECT_TRUE(at::equal(before[i], after[i]));
  }
  EXPECT_TRUE(contains(
      error_of<c10::ValueError>([] { lars::LAMB({at::zeros({2})}, LAMBOptions(0.1).betas(std::make_tuple(1.0, 0.9))); }),
      "betas must be in [0, 1)"));
  EXPECT_TRUE(contains(
      error_of<c10::ValueError>([] { lars::LAMB({at::zeros({2})}, LAMBOptions(0.1).max_grad_norm(0.0)); }),
      "max_grad_norm must be positive"));
}

TEST(LAMB, ExcludedGroupStepsAsAdamWAndAdaptedGroupsRecordRatios) {
  auto adapted = at::randn({20}).requires_grad_(true);
  auto excluded = at::randn({20}).requires_grad_(true);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{adapted});
  groups.emplace_back(
      std::vector<at::Tensor>{excluded}, std::make_unique<LAMBOptions>(LAMBOptions(0.01).lars_exclude(true)));
  lars::LAMB optimizer(groups, LAMBOptions(0.01));
  ReferenceParam reference_adapted(adapted.detach());
  ReferenceParam reference_excluded(excluded.detach());
  const auto g = at::randn({20});
  set_grad(adapted, g);
  set_grad(excluded, g);
  optimizer.step();
  reference_adapted.step_on(g, LAMBOptions(0.01), true);
  reference_excluded.step_on(g, LAMBOptions(0.01), false);
  EXPECT_LE(relative_error(adapted.detach(), reference_adapted.w), 2e-6);
  EXPECT_LE(relative_error(excluded.detach(), reference_excluded.w), 2e-6);
  const auto ratios = optimizer.trust_ratios();
  ASSERT_EQ(ratios.size(), 1u);
  EXPECT_TRUE(ratios[0].first.is_same(adapted));
  EXPECT_EQ(ratios[0].second.scalar_type(), at::kFloat);
  EXPECT_EQ(ratios[0].second.dim(), 0);
}

} // namespace
