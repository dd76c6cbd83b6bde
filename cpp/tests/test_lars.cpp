// The C++ API of liblars: options, the maths, the weight-decay takeover, state, streams.

#include <lars/fused.h>
#include <lars/lars.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <gtest/gtest.h>

#include "test_helpers.h"
#include <torch/cuda.h>
#include <torch/optim.h>
#include <torch/serialize.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using torch::optim::OptimizerParamGroup;

// What one LARS-over-plain-SGD step does to w, by hand, in double precision.
at::Tensor lars_sgd_reference(const at::Tensor& w, const at::Tensor& g, double lr, double wd,
                              const lars::LARSOptions& options) {
  const at::Tensor w64 = w.detach().to(at::kDouble);
  const at::Tensor g64 = g.to(at::kDouble);
  const double param_norm = w64.norm().item<double>();
  const double grad_norm = g64.norm().item<double>();
  double ratio = 1.0;
  if (param_norm > 0 && grad_norm > 0) {
    ratio = options.trust_coef() * param_norm / (grad_norm + wd * param_norm + options.eps());
  }
  if (options.clip()) {
    ratio = std::min(ratio / lr, 1.0);
  }
  return w64 - lr * ratio * (g64 + wd * w64);
}

at::Tensor leaf(at::IntArrayRef shape, double scale = 1.0) {
  return (at::randn(shape, at::kFloat) * scale).requires_grad_(true);
}

void set_grad(const at::Tensor& param, const at::Tensor& grad) {
  param.mutable_grad() = grad.clone();
}

using lars_test::contains;
using lars_test::error_of;

// A base optimizer LARS knows nothing about, whose options serialise a weight decay.
struct PlainOptions : torch::optim::OptimizerCloneableOptions<PlainOptions> {
  explicit PlainOptions(double weight_decay) : weight_decay_(weight_decay) {}
  void serialize(torch::serialize::OutputArchive& archive) const override {
    archive.write("lr", lr_);
    archive.write("weight_decay", weight_decay_);
  }
  void serialize(torch::serialize::InputArchive& archive) override {
    c10::IValue value;
    archive.read("weight_decay", value);
    weight_decay_ = value.toDouble();
  }
  double get_lr() const override { return lr_; }
  void set_lr(const double lr) override { lr_ = lr; }

 private:
  double lr_ = 0.1;
  double weight_decay_;
};

struct PlainOptimizer : torch::optim::Optimizer {
  PlainOptimizer(std::vector<at::Tensor> params, double weight_decay)
      : Optimizer(std::move(params), std::make_unique<PlainOptions>(weight_decay)) {}
  at::Tensor step(LossClosure) override {
    at::NoGradGuard no_grad;
    for (auto& param : param_groups_[0].params()) {
      param.sub_(param.grad(), param_groups_[0].options().get_lr());
    }
    return {};
  }
};

// An SGD whose step records the weight decay it sees, then fails.
struct FailingSGD : torch::optim::SGD {
  using SGD::SGD;
  at::Tensor step(LossClosure) override {
    weight_decay_seen =
        static_cast<torch::optim::SGDOptions&>(param_groups()[0].options()).weight_decay();
    TORCH_CHECK(false, "the base step failed");
  }
  double weight_decay_seen = -1;
};

double sgd_weight_decay(const torch::optim::Optimizer& optimizer, size_t group) {
  return static_cast<const torch::optim::SGDOptions&>(optimizer.param_groups()[group].options())
      .weight_decay();
}

// ---------------------------------------------------------------------------------------
// Options

TEST(LARSOptions, Defaults) {
  const lars::LARSOptions options;
  EXPECT_EQ(options.eps(), 1e-8);
  EXPECT_EQ(options.trust_coef(), 1e-3);
  EXPECT_FALSE(options.clip());
  EXPECT_TRUE(options.excluded_param_groups().empty());
}

TEST(LARSOptions, SettersChain) {
  const auto options = lars::LARSOptions().eps(1e-6).trust_coef(0.02).clip(true).excluded_param_groups({1});
  EXPECT_EQ(options.eps(), 1e-6);
  EXPECT_EQ(options.trust_coef(), 0.02);
  EXPECT_TRUE(options.clip());
  EXPECT_EQ(options.excluded_param_groups(), std::vector<size_t>{1});
}

TEST(LARSOptions, TrustRatioByNameOrEnum) {
  EXPECT_EQ(lars::LARSOptions().trust_ratio(), lars::TrustRatio::kPaper);
  EXPECT_EQ(lars::LARSOptions().trust_ratio("decayed").trust_ratio(), lars::TrustRatio::kDecayed);
  EXPECT_EQ(lars::LARSOptions().trust_ratio(lars::TrustRatio::kUpdate).trust_ratio(), lars::TrustRatio::kUpdate);
  EXPECT_TRUE(contains(error_of<c10::ValueError>([] { lars::LARSOptions().trust_ratio("lamb"); }),
                       "trust_ratio must be 'paper', 'decayed' or 'update', got 'lamb'"));
}

// TORCH_ARG setters take any value; a LARS refuses bad ones when built, and at a step after
// `options()` was changed, with nothing modified.
TEST(LARSOptions, LARSRefusesNegativeOrNaN) {
  auto w = leaf({3});
  auto sgd = [&] { return std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1)); };
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { lars::LARS(sgd(), lars::LARSOptions().eps(-1e-8)); }),
                       "lars::LARS: eps must be non-negative, got -1e-08"));
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { lars::LARS(sgd(), lars::LARSOptions().eps(std::nan(""))); }),
                       "eps must be non-negative"));
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { lars::LARS(sgd(), lars::LARSOptions().trust_coef(-0.5)); }),
                       "trust_coef must be non-negative, got -0.5"));
  lars::LARS optimizer(sgd());
  optimizer.options().trust_coef(-1.0);
  set_grad(w, at::randn({3}));
  const auto before = w.detach().clone();
  const auto grad_before = w.grad().clone();
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { optimizer.step(); }), "trust_coef must be non-negative"));
  EXPECT_TRUE(at::equal(w.detach(), before));
  EXPECT_TRUE(at::equal(w.grad(), grad_before));
}

// The trust-ratio variants against a reference written from functional.h, in fp64.
double reference_ratio(double param_norm, double norm, double wd, double lr, const lars::LARSOptions& options) {
  const double denominator = options.trust_ratio() == lars::TrustRatio::kPaper
      ? norm + wd * param_norm + options.eps()
      : norm + options.eps();
  double ratio = param_norm > 0 && norm > 0 ? options.trust_coef() * param_norm / denominator : 1.0;
  return options.clip() ? std::min(ratio / lr, 1.0) : ratio;
}

class Variants : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

// Around SGD with momentum (fused on the CPU) and around Adam (the multi-tensor path; and for
// "update", any base): three steps against the reference, and the ratios of the last step.
TEST_P(Variants, MatchTheReference) {
  const auto [name, around_adam] = GetParam();
  const auto options = lars::LARSOptions().trust_coef(0.02).eps(1e-6).clip(false).trust_ratio(name);
  const bool update = options.trust_ratio() == lars::TrustRatio::kUpdate;
  const double lr = 0.05, wd = 0.01;
  const auto init = at::randn({6, 5});
  auto w = init.clone().requires_grad_(true);
  auto reference = init.to(at::kDouble).requires_grad_(true);
  std::shared_ptr<torch::optim::Optimizer> base, reference_base;
  if (around_adam) {
    base = std::make_shared<torch::optim::Adam>(std::vector<at::Tensor>{w}, torch::optim::AdamOptions(lr).weight_decay(wd));
    reference_base = std::make_shared<torch::optim::Adam>(
        std::vector<at::Tensor>{reference}, torch::optim::AdamOptions(lr).weight_decay(update ? wd : 0.0));
  } else {
    base = std::make_shared<torch::optim::SGD>(
        std::vector<at::Tensor>{w}, torch::optim::SGDOptions(lr).momentum(0.9).weight_decay(wd));
    reference_base = std::make_shared<torch::optim::SGD>(
        std::vector<at::Tensor>{reference}, torch::optim::SGDOptions(lr).momentum(0.9).weight_decay(update ? wd : 0.0));
  }
  lars::LARS optimizer(base, options);
  EXPECT_TRUE(optimizer.trust_ratios().empty());
  double last_ratio = 0;
  for (int step = 0; step < 3; ++step) {
    const auto g = at::randn({6, 5});
    set_grad(w, g);
    optimizer.step();
    at::NoGradGuard no_grad;
    const auto r = reference.detach();
    const auto g64 = g.to(at::kDouble);
    if (update) {
      const auto before = r.clone();
      set_grad(reference, g64);
      reference_base->step();
      const auto u = r - before;
      last_ratio = reference_ratio(before.norm().item<double>(), u.norm().item<double>() / lr, wd, lr, options);
      r.copy_(before + last_ratio * u);
    } else {
      const auto decayed = g64 + wd * r;
      const double norm = options.trust_ratio() == lars::TrustRatio::kPaper ? g64.norm().item<double>()
                                                                             : decayed.norm().item<double>();
      last_ratio = reference_ratio(r.norm().item<double>(), norm, wd, lr, options);
      set_grad(reference, decayed * last_ratio);
      reference_base->step();
    }
  }
  EXPECT_TRUE(at::allclose(w.detach().to(at::kDouble), reference.detach(), 1e-5, 1e-6)) << name;
  const auto ratios = optimizer.trust_ratios();
  ASSERT_EQ(ratios.size(), 1u);
  EXPECT_TRUE(ratios[0].first.is_same(w));
  EXPECT_EQ(ratios[0].second.dim(), 0);
  EXPECT_EQ(ratios[0].second.scalar_type(), at::kFloat);
  EXPECT_NEAR(ratios[0].second.item<double>(), last_ratio, 1e-5 * last_ratio);
}

INSTANTIATE_TEST_SUITE_P(
    TrustRatio, Variants,
    ::testing::Combine(::testing::Values("paper", "decayed", "update"), ::testing::Bool()));

// "update" takes nothing from the base: any base is accepted, its weight decay included.
TEST(Variants, UpdateAcceptsAnyBaseWithWeightDecay) {
  auto w = leaf({3});
  auto base = std::make_shared<PlainOptimizer>(std::vector<at::Tensor>{w}, 1e-2);
  lars::LARS optimizer(base, lars::LARSOptions().trust_ratio("update"));
  set_grad(w, at::randn({3}));
  const auto before = w.detach().clone();
  optimizer.step();
  EXPECT_FALSE(at::equal(w.detach(), before));
}

TEST(FusedSGD, DecayedVariantAndTrustRatiosOut) {
  // The fused kernel's decayed ratio, maximize included, against ||(-g) + wd * w|| in fp64.
  const auto w = at::randn({130, 129});
  const auto g = at::randn({130, 129}) * 0.1;
  const double wd = 0.05, lr = 0.1;
  std::vector<at::Tensor> params{w.clone()};
  std::vector<at::Tensor> buffers{at::empty_like(w)};
  auto ratios = at::full({1}, -1.0, at::kFloat);
  const auto options = lars::LARSSGDOptions(lr).weight_decay(wd).momentum(0.9).maximize(true).trust_coef(0.02);
  lars::lars_sgd_(params, {g}, buffers, lars::LARSSGDOptions(options).trust_ratio("decayed"), /*is_first_step=*/true,
                  std::nullopt, std::nullopt, ratios);
  const auto w64 = w.to(at::kDouble);
  const auto d = -g.to(at::kDouble) + wd * w64;
  const double expected = 0.02 * w64.norm().item<double>() / (d.norm().item<double>() + 1e-8);
  EXPECT_NEAR(ratios[0].item<double>(), expected, 1e-6 * expected);
  EXPECT_TRUE(at::allclose(params[0].to(at::kDouble), w64 - lr * expected * d, 1e-6, 1e-7));
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] {
                         lars::lars_sgd_(params, {g}, buffers, lars::LARSSGDOptions(options).trust_ratio("update"),
                                         false);
                       }),
                       "trust_ratio must be 'paper' or 'decayed'"));
}

// ---------------------------------------------------------------------------------------
// Construction

TEST(LARS, IsAnOptimizerWithTheBaseParamGroups) {
  auto w = leaf({3, 2});
  auto b = leaf({2});
  auto sgd = std::make_shared<torch::optim::SGD>(
      std::vector<OptimizerParamGroup>{OptimizerParamGroup({w}), OptimizerParamGroup({b})},
      torch::optim::SGDOptions(0.1).weight_decay(1e-4));
  lars::LARS optimizer(sgd);
  torch::optim::Optimizer& as_optimizer = optimizer;
  ASSERT_EQ(as_optimizer.param_groups().size(), 2u);
  EXPECT_TRUE(as_optimizer.param_groups()[1].params()[0].is_same(b));
  EXPECT_EQ(as_optimizer.param_groups()[0].options().get_lr(), 0.1);
  EXPECT_EQ(optimizer.base(), sgd);
}

TEST(LARS, RefusesNullAndNestedBases) {
  EXPECT_TRUE(contains(error_of<c10::ValueError>([] { lars::LARS(nullptr); }), "base optimizer is null"));
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{leaf({2})}, torch::optim::SGDOptions(0.1));
  auto inner = std::make_shared<lars::LARS>(sgd);
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { lars::LARS outer(inner); }), "already a lars::LARS"));
}

TEST(LARS, RefusesMissingExcludedGroup) {
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{leaf({2})}, torch::optim::SGDOptions(0.1));
  const auto message = error_of<c10::IndexError>(
      [&] { lars::LARS optimizer(sgd, lars::LARSOptions().excluded_param_groups({1})); });
  EXPECT_TRUE(contains(message, "excluded param group 1 does not exist; the optimizer has 1 param groups"));
}

TEST(LARS, RefusesOtherBaseWithWeightDecay) {
  auto base = std::make_shared<PlainOptimizer>(std::vector<at::Tensor>{leaf({2})}, 0.01);
  const auto message = error_of<c10::ValueError>([&] { lars::LARS optimizer(base); });
  EXPECT_TRUE(contains(message, "weight_decay=0.01"));
  EXPECT_TRUE(contains(message, "SGD, Adam, AdamW, RMSprop and Adagrad"));
}

TEST(LARS, AcceptsOtherBaseWithoutWeightDecay) {
  auto w = leaf({4, 3});
  auto base = std::make_shared<PlainOptimizer>(std::vector<at::Tensor>{w}, 0.0);
  const auto options = lars::LARSOptions().trust_coef(0.01);
  lars::LARS optimizer(base, options);
  const auto g = at::randn({4, 3});
  set_grad(w, g);
  const auto expected = lars_sgd_reference(w, g, 0.1, 0.0, options);
  optimizer.step();
  EXPECT_TRUE(at::allclose(w.detach().to(at::kDouble), expected, 1e-6, 1e-7));
}

TEST(LARS, AcceptsAnExcludedGroupOfAnyBase) {
  auto base = std::make_shared<PlainOptimizer>(std::vector<at::Tensor>{leaf({2})}, 0.01);
  lars::LARS optimizer(base, lars::LARSOptions().excluded_param_groups({0}));
  EXPECT_EQ(optimizer.param_groups().size(), 1u);
}

// ---------------------------------------------------------------------------------------
// The step

class LARSOverSGD : public ::testing::TestWithParam<bool> {};

TEST_P(LARSOverSGD, MatchesTheFormula) {
  const bool clip = GetParam();
  auto w = leaf({5, 4});
  const double lr = 0.5, wd = 0.01;
  const auto options = lars::LARSOptions().trust_coef(0.02).eps(1e-6).clip(clip);
  lars::LARS optimizer(
      std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(lr).weight_decay(wd)),
      options);
  const auto g = at::randn({5, 4});
  set_grad(w, g);
  const auto expected = lars_sgd_reference(w, g, lr, wd, options);
  optimizer.step();
  EXPECT_TRUE(at::allclose(w.detach().to(at::kDouble), expected, 1e-6, 1e-7));
}

INSTANTIATE_TEST_SUITE_P(Clip, LARSOverSGD, ::testing::Bool());

TEST(LARS, ZeroNormsKeepTheGradient) {
  auto zero_param = at::zeros({3}).requires_grad_(true);
  auto zero_grad_param = leaf({3});
  lars::LARS optimizer(std::make_shared<torch::optim::SGD>(
      std::vector<at::Tensor>{zero_param, zero_grad_param}, torch::optim::SGDOptions(0.1)));
  const auto g = at::randn({3});
  set_grad(zero_param, g);
  set_grad(zero_grad_param, at::zeros({3}));
  const auto before = zero_grad_param.detach().clone();
  optimizer.step();
  EXPECT_TRUE(at::allclose(zero_param.detach(), -0.1 * g));
  EXPECT_TRUE(at::equal(zero_grad_param.detach(), before));
}

TEST(LARS, ExcludedGroupIsLeftToTheBase) {
  auto adapted = leaf({4, 4});
  auto excluded = leaf({4});
  const double lr = 0.1, wd = 0.05;
  auto sgd = std::make_shared<torch::optim::SGD>(
      std::vector<OptimizerParamGroup>{OptimizerParamGroup({adapted}), OptimizerParamGroup({excluded})},
      torch::optim::SGDOptions(lr).weight_decay(wd));
  const auto options = lars::LARSOptions().excluded_param_groups({1});
  lars::LARS optimizer(sgd, options);
  const auto g_adapted = at::randn({4, 4});
  const auto g_excluded = at::randn({4});
  set_grad(adapted, g_adapted);
  set_grad(excluded, g_excluded);
  const auto expected_adapted = lars_sgd_reference(adapted, g_adapted, lr, wd, options);
  const auto expected_excluded = excluded.detach() - lr * (g_excluded + wd * excluded.detach());
  optimizer.step();
  EXPECT_TRUE(at::allclose(adapted.detach().to(at::kDouble), expected_adapted, 1e-6, 1e-7));
  EXPECT_TRUE(at::allclose(excluded.detach(), expected_excluded));
  EXPECT_TRUE(at::allclose(excluded.grad(), g_excluded)); // unscaled
}

TEST(LARS, StepEvaluatesTheClosureFirst) {
  auto w = leaf({3, 3});
  const auto options = lars::LARSOptions().trust_coef(0.1);
  lars::LARS optimizer(std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1)), options);
  set_grad(w, at::full({3, 3}, 1e3)); // stale: the closure's gradient must replace it
  const auto x = at::randn({3});
  bool grad_mode_in_closure = false;
  const auto before = w.detach().clone();
  const auto loss = optimizer.step([&] {
    grad_mode_in_closure = at::GradMode::is_enabled();
    optimizer.zero_grad();
    auto value = at::matmul(w, x).pow(2).sum();
    value.backward();
    return value;
  });
  ASSERT_TRUE(loss.defined());
  EXPECT_TRUE(grad_mode_in_closure);
  const auto closure_grad = 2 * at::outer(at::matmul(before, x), x);
  EXPECT_TRUE(at::allclose(w.detach().to(at::kDouble), lars_sgd_reference(before, closure_grad, 0.1, 0.0, options), 1e-6, 1e-7));
}

TEST(LARS, RefusesSparseGradientsBeforeScalingAny) {
  auto dense = leaf({3});
  auto sparse = leaf({4, 2});
  lars::LARS optimizer(std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{dense, sparse}, torch::optim::SGDOptions(0.1)));
  const auto g = at::randn({3});
  set_grad(dense, g);
  sparse.mutable_grad() = at::randn({4, 2}).to_sparse();
  const auto before = sparse.detach().clone();
  const auto message = error_of<c10::ValueError>([&] { optimizer.step(); });
  EXPECT_TRUE(contains(message, "sparse gradients: parameter 1 of param group 0"));
  EXPECT_TRUE(at::equal(dense.grad(), g));
  EXPECT_TRUE(at::equal(sparse.detach(), before));
}

TEST(LARS, RefusesAWeightDecayItCannotTakeBeforeScalingAny) {
  // Group 0 is fine; group 1 is given, after construction, a weight decay LARS cannot take
  // from this base.
  auto w = leaf({3});
  auto extra = leaf({2});
  lars::LARS optimizer(std::make_shared<PlainOptimizer>(std::vector<at::Tensor>{w}, 0.0));
  optimizer.add_param_group(OptimizerParamGroup({extra}));
  optimizer.param_groups()[1].set_options(std::make_unique<PlainOptions>(0.01));
  const auto g = at::randn({3});
  set_grad(w, g);
  set_grad(extra, at::randn({2}));
  const auto before = w.detach().clone();
  const auto message = error_of<c10::ValueError>([&] { optimizer.step(); });
  EXPECT_TRUE(contains(message, "weight_decay=0.01"));
  EXPECT_TRUE(at::equal(w.grad(), g));
  EXPECT_TRUE(at::equal(w.detach(), before));
}

TEST(LARS, RefusesAMismatchedGradientBeforeScalingAny) {
  auto w = leaf({3});
  auto v = leaf({4, 2});
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1));
  lars::LARS optimizer(sgd);
  optimizer.add_param_group(OptimizerParamGroup({v}, std::make_unique<torch::optim::SGDOptions>(0.1)));
  const auto g = at::randn({3});
  set_grad(w, g);
  v.mutable_grad() = at::randn({8});
  const auto message = error_of<c10::ValueError>([&] { optimizer.step(); });
  EXPECT_TRUE(contains(message, "the gradient of parameter 0 of param group 1"));
  EXPECT_TRUE(at::equal(w.grad(), g));
}

// ---------------------------------------------------------------------------------------
// Weight decay: taken for LARS, restored after the base step

TEST(LARS, RestoresTheBaseWeightDecayAfterTheStep) {
  auto w = leaf({3, 3});
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1).weight_decay(1e-4));
  lars::LARS optimizer(sgd);
  set_grad(w, at::randn({3, 3}));
  optimizer.step();
  EXPECT_EQ(sgd_weight_decay(*sgd, 0), 1e-4);
  EXPECT_EQ(sgd_weight_decay(optimizer, 0), 1e-4);
}

TEST(LARS, RestoresTheBaseWeightDecayWhenTheBaseStepThrows) {
  auto w = leaf({3, 3});
  auto failing = std::make_shared<FailingSGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1).weight_decay(1e-4));
  lars::LARS optimizer(failing);
  set_grad(w, at::randn({3, 3}));
  EXPECT_TRUE(contains(error_of<c10::Error>([&] { optimizer.step(); }), "the base step failed"));
  EXPECT_EQ(failing->weight_decay_seen, 0.0);
  EXPECT_EQ(sgd_weight_decay(*failing, 0), 1e-4);
}

template <typename Base, typename Options>
void expect_weight_decay_taken(Options options) {
  auto w = leaf({4, 3});
  auto base = std::make_shared<Base>(std::vector<at::Tensor>{w}, options);
  auto twin_w = w.detach().clone().requires_grad_(true);
  // The twin: the same base, weight decay 0, fed the gradient LARS makes.
  auto twin = std::make_shared<Base>(std::vector<at::Tensor>{twin_w}, Options(options).weight_decay(0));
  // A trust coefficient of 1 keeps the ratio near 1, so that a decay taken twice, or not at
  // all, moves w by about lr * wd * |w|, far above rounding.
  const auto lars_options = lars::LARSOptions().trust_coef(1.0);
  lars::LARS optimizer(base, lars_options);
  for (int step = 0; step < 3; ++step) {
    const auto g = at::randn({4, 3});
    set_grad(w, g);
    optimizer.step();
    twin_w.mutable_grad() = g.clone();
    lars::lars_scale_gradients_({twin_w.detach()}, {twin_w.grad()}, options.weight_decay(),
                                at::scalar_tensor(options.lr(), at::kDouble), lars_options.eps(),
                                lars_options.trust_coef(), lars_options.clip());
    twin->step();
    if constexpr (std::is_same_v<Base, torch::optim::SGD>) {
      // Equal to rounding: over SGD, LARS steps through the fused kernel, which sums the norms
      // in another order than the twin's ATen ops (steps 1 ulp apart were seen).
      ASSERT_TRUE(at::allclose(w.detach(), twin_w.detach(), 1e-6, 1e-7)) << "step " << step;
    } else {
      ASSERT_TRUE(at::equal(w.detach(), twin_w.detach())) << "step " << step;
    }
  }
  EXPECT_EQ(static_cast<Options&>(base->param_groups()[0].options()).weight_decay(), options.weight_decay());
}

TEST(LARS, TakesTheWeightDecayOfEveryKnownBase) {
  expect_weight_decay_taken<torch::optim::SGD>(torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(0.01));
  expect_weight_decay_taken<torch::optim::Adam>(torch::optim::AdamOptions(0.01).weight_decay(0.01));
  expect_weight_decay_taken<torch::optim::AdamW>(torch::optim::AdamWOptions(0.01).weight_decay(0.01));
  expect_weight_decay_taken<torch::optim::RMSprop>(torch::optim::RMSpropOptions(0.01).weight_decay(0.01));
  expect_weight_decay_taken<torch::optim::Adagrad>(torch::optim::AdagradOptions(0.01).weight_decay(0.01));
}

// ---------------------------------------------------------------------------------------
// Param groups through the LARS: schedulers, add_param_group

TEST(LARS, SchedulersDriveTheBase) {
  auto w = leaf({3, 3});
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1));
  lars::LARS optimizer(sgd, lars::LARSOptions().clip(true));
  torch::optim::StepLR scheduler(optimizer, /*step_size=*/1, /*gamma=*/0.5);
  for (int epoch = 0; epoch < 3; ++epoch) {
    set_grad(w, at::randn({3, 3}));
    optimizer.step();
    scheduler.step();
  }
  const double scheduled_lr = optimizer.param_groups()[0].options().get_lr();
  EXPECT_LT(scheduled_lr, 0.1);
  set_grad(w, at::randn({3, 3}));
  optimizer.step();
  EXPECT_EQ(sgd->param_groups()[0].options().get_lr(), scheduled_lr);
}

TEST(LARS, AddParamGroupReachesTheBase) {
  auto w = leaf({3, 3});
  auto extra = leaf({2, 2});
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1));
  const auto options = lars::LARSOptions().trust_coef(0.01);
  lars::LARS optimizer(sgd, options);
  optimizer.add_param_group(OptimizerParamGroup({extra}, std::make_unique<torch::optim::SGDOptions>(0.2)));
  set_grad(w, at::randn({3, 3}));
  const auto g = at::randn({2, 2});
  set_grad(extra, g);
  const auto expected = lars_sgd_reference(extra, g, 0.2, 0.0, options);
  optimizer.step();
  ASSERT_EQ(sgd->param_groups().size(), 2u);
  EXPECT_TRUE(at::allclose(extra.detach().to(at::kDouble), expected, 1e-6, 1e-7));
}

// ---------------------------------------------------------------------------------------
// save / load

struct Trained {
  at::Tensor w;
  std::shared_ptr<torch::optim::SGD> sgd;
  std::unique_ptr<lars::LARS> optimizer;
};

Trained make_trained(const at::Tensor& init, const lars::LARSOptions& options) {
  auto w = init.clone().requires_grad_(true);
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
  return {w, sgd, std::make_unique<lars::LARS>(sgd, options)};
}

void train(const at::Tensor& w, torch::optim::Optimizer& optimizer, const std::vector<at::Tensor>& grads) {
  for (const auto& g : grads) {
    set_grad(w, g);
    optimizer.step();
  }
}

TEST(LARS, SaveLoadContinuesIdentically) {
  const auto init = at::randn({4, 4});
  const std::vector<at::Tensor> grads = {at::randn({4, 4}), at::randn({4, 4}), at::randn({4, 4}), at::randn({4, 4})};
  const auto options = lars::LARSOptions().eps(1e-6).trust_coef(0.02).clip(true);
  auto first = make_trained(init, options);
  train(first.w, *first.optimizer, {grads[0], grads[1]});

  std::stringstream saved;
  torch::save(*first.optimizer, saved);
  auto second = make_trained(first.w.detach(), lars::LARSOptions());
  torch::load(*second.optimizer, saved);
  EXPECT_EQ(second.optimizer->options().eps(), 1e-6);
  EXPECT_EQ(second.optimizer->options().trust_coef(), 0.02);
  EXPECT_TRUE(second.optimizer->options().clip());

  train(first.w, *first.optimizer, {grads[2], grads[3]});
  train(second.w, *second.optimizer, {grads[2], grads[3]});
  EXPECT_TRUE(at::equal(first.w, second.w));
}

struct TwoGroups {
  at::Tensor w, extra;
  std::unique_ptr<lars::LARS> optimizer;
};

// SGD on `w`, and a second param group for `extra` added through the LARS.
TwoGroups make_two_groups(const at::Tensor& w_init, const at::Tensor& extra_init) {
  auto w = w_init.clone().requires_grad_(true);
  auto extra = extra_init.clone().requires_grad_(true);
  auto sgd = std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1).momentum(0.9));
  auto optimizer = std::make_unique<lars::LARS>(sgd, lars::LARSOptions().trust_coef(0.02));
  optimizer->add_param_group(
      OptimizerParamGroup({extra}, std::make_unique<torch::optim::SGDOptions>(torch::optim::SGDOptions(0.2).momentum(0.9))));
  return {w, extra, std::move(optimizer)};
}

TEST(LARS, LoadsAfterAddParamGroup) {
  auto first = make_two_groups(at::randn({4, 4}), at::randn({3, 2}));
  for (int step = 0; step < 2; ++step) {
    set_grad(first.w, at::randn({4, 4}));
    set_grad(first.extra, at::randn({3, 2}));
    first.optimizer->step();
  }
  std::stringstream saved;
  torch::save(*first.optimizer, saved);
  // Its added group has not reached the base yet (no step since): the load must still work.
  auto second = make_two_groups(first.w.detach(), first.extra.detach());
  torch::load(*second.optimizer, saved);
  const auto g = at::randn({4, 4});
  const auto extra_g = at::randn({3, 2});
  for (auto* run : {&first, &second}) {
    set_grad(run->w, g);
    set_grad(run->extra, extra_g);
    run->optimizer->step();
  }
  EXPECT_TRUE(at::equal(first.w, second.w));
  EXPECT_TRUE(at::equal(first.extra, second.extra));
}

TEST(LARS, ArchivesAreInterchangeableWithThePlainBase) {
  const auto init = at::randn({4, 4});
  const std::vector<at::Tensor> grads = {at::randn({4, 4}), at::randn({4, 4}), at::randn({4, 4})};
  const auto options = lars::LARSOptions().trust_coef(0.05);
  auto trained = make_trained(init, options);
  train(trained.w, *trained.optimizer, {grads[0], grads[1]});

  // A plain SGD loads the LARS archive: it gets the momentum buffer.
  std::stringstream from_lars;
  torch::save(*trained.optimizer, from_lars);
  auto plain_w = trained.w.detach().clone().requires_grad_(true);
  torch::optim::SGD plain(std::vector<at::Tensor>{plain_w}, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-3));
  torch::load(plain, from_lars);
  const auto& buffer = static_cast<torch::optim::SGDParamState&>(*plain.state().begin()->second).momentum_buffer();
  const auto& trained_buffer = static_cast<torch::optim::SGDParamState&>(*trained.sgd->state().begin()->second).momentum_buffer();
  EXPECT_TRUE(at::equal(buffer, trained_buffer));

  // LARS loads the plain archive and keeps its own options.
  std::stringstream from_plain;
  torch::save(plain, from_plain);
  auto resumed = make_trained(plain_w.detach(), options);
  torch::load(*resumed.optimizer, from_plain);
  EXPECT_EQ(resumed.optimizer->options().trust_coef(), 0.05);
  train(trained.w, *trained.optimizer, {grads[2]});
  train(resumed.w, *resumed.optimizer, {grads[2]});
  EXPECT_TRUE(at::equal(trained.w, resumed.w));
}

// ---------------------------------------------------------------------------------------
// The functional core

TEST(ScaleGradients, HalfTypesAccumulateNormsInFloat) {
  const auto w = at::randn({64, 64}).to(at::kBFloat16);
  const auto g = at::randn({64, 64}).to(at::kBFloat16);
  auto scaled = g.clone();
  lars::lars_scale_gradients_({w}, {scaled}, 0.0, at::scalar_tensor(0.1, at::kDouble), 0.0, 1.0, false);
  const auto ratio = w.to(at::kFloat).norm() / g.to(at::kFloat).norm();
  // The fp32 ratio multiplies in fp32, and the product is rounded once.
  EXPECT_TRUE(at::equal(scaled, (g.to(at::kFloat) * ratio).to(at::kBFloat16)));
}

TEST(ScaleGradients, GroupsByDtype) {
  const std::vector<at::Tensor> params = {at::randn({3}), at::randn({4}, at::kDouble), at::randn({5})};
  std::vector<at::Tensor> grads = {at::randn({3}), at::randn({4}, at::kDouble), at::randn({5})};
  std::vector<at::Tensor> one_by_one;
  for (size_t i = 0; i < params.size(); ++i) {
    one_by_one.push_back(grads[i].clone());
    lars::lars_scale_gradients_({params[i]}, {one_by_one[i]}, 0.01, at::scalar_tensor(0.1, at::kDouble), 1e-8, 1e-3, true);
  }
  lars::lars_scale_gradients_(params, grads, 0.01, at::scalar_tensor(0.1, at::kDouble), 1e-8, 1e-3, true);
  for (size_t i = 0; i < params.size(); ++i) {
    EXPECT_TRUE(at::equal(grads[i], one_by_one[i])) << i;
  }
}

TEST(ScaleGradients, RefusesMismatchedLists) {
  std::vector<at::Tensor> grads = {at::randn({3})};
  EXPECT_TRUE(contains(error_of<c10::Error>([&] {
    lars::lars_scale_gradients_({at::randn({3}), at::randn({3})}, grads, 0.0, at::scalar_tensor(0.1), 0.0, 1e-3, false);
  }), "got 2 params but 1 grads"));
  EXPECT_TRUE(contains(error_of<c10::Error>([&] {
    lars::lars_scale_gradients_({at::randn({4})}, grads, 0.0, at::scalar_tensor(0.1), 0.0, 1e-3, false);
  }), "grads[0] (Float[3] on cpu) does not match params[0] (Float[4] on cpu)"));
}

// ---------------------------------------------------------------------------------------
// Streams (CUDA only): a step under a caller's StreamGuard, on a side stream.

TEST(LARSStreams, StepsOnTheCallersStream) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "needs CUDA";
  }
  const c10::Device cuda(c10::DeviceType::CUDA, 0);
  const auto init = at::randn({256, 128}).to(cuda);
  const auto g = at::randn({256, 128}).to(cuda);
  auto run = [&](bool side_stream) {
    auto w = init.clone().requires_grad_(true);
    lars::LARS optimizer(std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, torch::optim::SGDOptions(0.1).momentum(0.9).weight_decay(1e-4)));
    set_grad(w, g);
    if (!side_stream) {
      optimizer.step();
      return w.detach().cpu();
    }
    c10::impl::VirtualGuardImpl device_api(c10::DeviceType::CUDA);
    const c10::Stream side = device_api.getStreamFromGlobalPool(cuda);
    c10::Event inputs_ready(c10::DeviceType::CUDA); // the inputs were made on the current stream
    inputs_ready.record(device_api.getStream(cuda));
    inputs_ready.block(side);
    {
      c10::StreamGuard guard(side);
      optimizer.step();
      EXPECT_EQ(device_api.getStream(cuda), side);
    }
    side.synchronize();
    return w.detach().cpu();
  };
  EXPECT_TRUE(at::equal(run(true), run(false)));
}

// ---------------------------------------------------------------------------------------
// The fused step around torch::optim::SGD (lars/fused.h)

constexpr double kFusedLr = 0.1, kFusedMomentum = 0.9, kFusedWeightDecay = 1e-3, kFusedTrustCoef = 0.02;

// More than one chunk of the kernel (2**14 elements), and not a whole number of its lanes.
const std::vector<int64_t> kFusedShape = {130, 129};

struct FusedLARS {
  explicit FusedLARS(const at::Tensor& init, torch::optim::SGDOptions options = torch::optim::SGDOptions(kFusedLr)
                                                   .momentum(kFusedMomentum)
                                                   .weight_decay(kFusedWeightDecay))
      : w(init.clone().requires_grad_(true)),
        sgd(std::make_shared<torch::optim::SGD>(std::vector<at::Tensor>{w}, options)),
        optimizer(std::make_unique<lars::LARS>(sgd, lars::LARSOptions().trust_coef(kFusedTrustCoef))) {}

  at::Tensor momentum_buffer(const at::Tensor& param) const {
    return static_cast<torch::optim::SGDParamState&>(*sgd->state().at(param.unsafeGetTensorImpl())).momentum_buffer();
  }

  at::Tensor w;
  std::shared_ptr<torch::optim::SGD> sgd;
  std::unique_ptr<lars::LARS> optimizer;
};

// w after one fused step from w, g and the momentum buffer: what lars::LARS must give bit for bit.
at::Tensor fused_step_of(const at::Tensor& w, const at::Tensor& g, const at::Tensor& buffer, bool is_first_step) {
  std::vector<at::Tensor> params{w.detach().clone()};
  std::vector<at::Tensor> buffers{is_first_step ? at::empty_like(w) : buffer.clone()};
  lars::lars_sgd_(
      params, {g}, buffers,
      lars::LARSSGDOptions(kFusedLr).weight_decay(kFusedWeightDecay).momentum(kFusedMomentum).trust_coef(kFusedTrustCoef),
      is_first_step);
  return params[0];
}

TEST(FusedSGD, MatchesScalingThenSGD) {
  using torch::optim::SGDOptions;
  for (const auto& options : {SGDOptions(kFusedLr), SGDOptions(kFusedLr).momentum(0.9).dampening(0.3),
                              SGDOptions(kFusedLr).momentum(0.9).nesterov(true)}) {
    const auto init = at::randn(kFusedShape);
    FusedLARS fused(init, SGDOptions(options).weight_decay(kFusedWeightDecay));
    auto w = init.clone().requires_grad_(true);
    torch::optim::SGD sgd(std::vector<at::Tensor>{w}, options);
    for (int step = 0; step < 10; ++step) {
      const auto g = at::randn(kFusedShape) * 0.1;
      auto scaled = g.clone();
      lars::lars_scale_gradients_({w}, {scaled}, kFusedWeightDecay, at::scalar_tensor(kFusedLr, at::kDouble), 1e-8,
                                  kFusedTrustCoef, false);
      set_grad(w, scaled);
      sgd.step();
      set_grad(fused.w, g);
      fused.optimizer->step();
      EXPECT_TRUE(at::equal(fused.w.grad(), g)); // the fused step leaves the gradient as it is
    }
    const double relative = ((fused.w - w).abs().max() / w.abs().max()).item<double>();
    EXPECT_LE(relative, 1e-6) << "momentum " << options.momentum() << ", nesterov " << options.nesterov();
  }
}

TEST(FusedSGD, LARSStepsWithTheOperator) {
  FusedLARS fused(at::randn(kFusedShape));
  for (int step = 0; step < 4; ++step) {
    const auto g = at::randn(kFusedShape) * 0.1;
    const auto expected = step == 0 ? fused_step_of(fused.w, g, {}, true)
                                    : fused_step_of(fused.w, g, fused.momentum_buffer(fused.w), false);
    set_grad(fused.w, g);
    fused.optimizer->step();
    ASSERT_TRUE(at::equal(fused.w, expected)) << "step " << step;
  }
}

TEST(FusedSGD, AStepDoesNotDependOnTheThreadCount) {
  // Several chunks of the kernel (2**14 elements) and a small tensor: the norms' partial sums
  // are added in an order fixed by the sizes.
  const std::vector<at::Tensor> init = {at::randn({5 * (1 << 14) + 3}), at::randn({300, 7})};
  const std::vector<at::Tensor> grads = {at::randn({5 * (1 << 14) + 3}), at::randn({300, 7})};
  auto step_on = [&](int threads) {
    const int before = at::get_num_threads();
    at::set_num_threads(threads);
    std::vector<at::Tensor> params = {init[0].clone(), init[1].clone()};
    auto ratios = at::empty({2}, at::kFloat);
    lars::lars_sgd_(params, grads, {},
                    lars::LARSSGDOptions(kFusedLr).weight_decay(kFusedWeightDecay).trust_coef(kFusedTrustCoef),
                    /*is_first_step=*/true, std::nullopt, std::nullopt, ratios);
    at::set_num_threads(before);
    return std::make_pair(params, ratios);
  };
  const auto [one, one_ratios] = step_on(1);
  const auto [two, two_ratios] = step_on(2);
  EXPECT_TRUE(at::equal(one_ratios, two_ratios));
  EXPECT_TRUE(at::equal(one[0], two[0]) && at::equal(one[1], two[1]));
}

TEST(FusedSGD, AnInPlaceEditOfTheParameterIsSeen) {
  FusedLARS fused(at::randn(kFusedShape));
  for (int step = 0; step < 2; ++step) {
    set_grad(fused.w, at::randn(kFusedShape) * 0.1);
    fused.optimizer->step();
  }
  {
    at::NoGradGuard no_grad;
    at::AutoDispatchBelowADInplaceOrView below_version_counting;
    fused.w.mul_(3); // not even seen by the version counter
  }
  const auto g = at::randn(kFusedShape) * 0.1;
  const auto expected = fused_step_of(fused.w, g, fused.momentum_buffer(fused.w), false);
  set_grad(fused.w, g);
  fused.optimizer->step();
  EXPECT_TRUE(at::equal(fused.w, expected));
}

TEST(FusedSGD, AReplacedParameterStartsAfresh) {
  FusedLARS fused(at::randn(kFusedShape));
  set_grad(fused.w, at::randn(kFusedShape) * 0.1);
  fused.optimizer->step();
  auto replacement = at::randn(kFusedShape).requires_grad_(true);
  fused.optimizer->param_groups()[0].params()[0] = replacement;
  const auto g = at::randn(kFusedShape) * 0.1;
  const auto expected = fused_step_of(replacement, g, {}, true);
  set_grad(replacement, g);
  fused.optimizer->step();
  EXPECT_TRUE(at::equal(replacement, expected));
}

TEST(FusedSGD, ResumesFromAnArchiveBitForBit) {
  FusedLARS trained(at::randn(kFusedShape));
  std::vector<at::Tensor> grads;
  for (int step = 0; step < 6; ++step) {
    grads.push_back(at::randn(kFusedShape) * 0.1);
  }
  train(trained.w, *trained.optimizer, {grads[0], grads[1], grads[2]});
  std::stringstream archive;
  torch::save(*trained.optimizer, archive);
  FusedLARS resumed(trained.w.detach());
  torch::load(*resumed.optimizer, archive);
  train(trained.w, *trained.optimizer, {grads[3], grads[4], grads[5]});
  train(resumed.w, *resumed.optimizer, {grads[3], grads[4], grads[5]});
  EXPECT_TRUE(at::equal(trained.w, resumed.w));
  EXPECT_TRUE(at::equal(trained.momentum_buffer(trained.w), resumed.momentum_buffer(resumed.w)));
}

} // namespace
