// lars::LARSSGD: the numbers of lars::LARS over torch::optim::SGD, its options, its archive.

#include <lars/lars.h>
#include <lars/lars_sgd.h>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "test_helpers.h"
#include <torch/optim.h>
#include <torch/serialize.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

using lars::LARSSGD;
using lars::LARSSGDOptions;
using torch::optim::OptimizerParamGroup;
using torch::optim::SGDOptions;
using torch::optim::SGDParamState;

using lars_test::contains;
using lars_test::error_of;

at::Tensor momentum_buffer(const torch::optim::Optimizer& optimizer, const at::Tensor& param) {
  const auto found = optimizer.state().find(param.unsafeGetTensorImpl());
  if (found == optimizer.state().end()) {
    return {};
  }
  return static_cast<const SGDParamState&>(*found->second).momentum_buffer();
}

// The settings of one comparison: the SGD ones and the LARS ones.
struct Config {
  double momentum, dampening;
  bool nesterov, maximize;
  double weight_decay;
  bool clip;
  lars::TrustRatio trust_ratio;
  at::ScalarType dtype;

  std::string describe() const {
    std::ostringstream out;
    out << "momentum " << momentum << " dampening " << dampening << " nesterov " << nesterov << " maximize "
        << maximize << " weight_decay " << weight_decay << " clip " << clip << " trust_ratio "
        << lars::trust_ratio_name(trust_ratio) << " dtype " << dtype;
    return out.str();
  }
};

std::vector<Config> every_config() {
  struct Momentum {
    double momentum, dampening;
    bool nesterov;
  };
  std::vector<Config> configs;
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    for (const Momentum m : {Momentum{0, 0, false}, Momentum{0.9, 0, false}, Momentum{0.9, 0.3, false},
                             Momentum{0.9, 0, true}}) {
      for (const bool maximize : {false, true}) {
        for (const double weight_decay : {0.0, 1e-2}) {
          for (const bool clip : {false, true}) {
            for (const auto variant : {lars::TrustRatio::kPaper, lars::TrustRatio::kDecayed}) {
              configs.push_back({m.momentum, m.dampening, m.nesterov, maximize, weight_decay, clip, variant, dtype});
            }
          }
        }
      }
    }
  }
  return configs;
}

constexpr double kLr = 0.1;
constexpr double kTrustCoef = 0.02;
constexpr double kEps = 1e-7;

// Two adapted parameters (one of them with small gradients, so that clip clips it) and an
// excluded one, with the gradients of `steps` steps.
struct Problem {
  std::vector<at::Tensor> init;
  std::vector<std::vector<at::Tensor>> grads;
};

Problem make_problem(at::ScalarType dtype, int steps) {
  Problem problem;
  problem.init = {at::randn({4, 5}).to(dtype), at::randn({7}).to(dtype), at::randn({3}).to(dtype)};
  for (int step = 0; step < steps; ++step) {
    problem.grads.push_back(
        {(at::randn({4, 5}) * 0.01).to(dtype), at::randn({7}).to(dtype), at::randn({3}).to(dtype)});
  }
  return problem;
}

std::vector<at::Tensor> leaves(const std::vector<at::Tensor>& init) {
  std::vector<at::Tensor> params;
  for (const auto& tensor : init) {
    params.push_back(tensor.clone().requires_grad_(true));
  }
  return params;
}

void set_grads(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads, double sign = 1.0) {
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].mutable_grad() = sign == 1.0 ? grads[i].clone() : grads[i].neg();
  }
}

LARSSGDOptions larssgd_options(const Config& c) {
  return LARSSGDOptions(kLr)
      .momentum(c.momentum)
      .dampening(c.dampening)
      .nesterov(c.nesterov)
      .maximize(c.maximize)
      .weight_decay(c.weight_decay)
      .eps(kEps)
      .trust_coef(kTrustCoef)
      .clip(c.clip)
      .trust_ratio(c.trust_ratio);
}

// [adapted group {w, v}, excluded group {b}]
std::unique_ptr<LARSSGD> make_larssgd(const std::vector<at::Tensor>& params, const LARSSGDOptions& options) {
  std::vector<OptimizerParamGroup> groups;
  groups.emplace_back(std::vector<at::Tensor>{params[0], params[1]});
  groups.emplace_back(
      std::vector<at::Tensor>{params[2]}, std::make_unique<LARSSGDOptions>(LARSSGDOptions(options).lars_exclude(true)));
  return std::make_unique<LARSSGD>(groups, options);
}

SGDOptions sgd_options(const Config& c) {
  return SGDOptions(kLr).momentum(c.momentum).dampening(c.dampening).nesterov(c.nesterov).weight_decay(c.weight_decay);
}

TEST(LARSSGD, MatchesLARSOverSGDForEveryOption) {
  constexpr int kSteps = 4;
  for (const Config& config : every_config()) {
    SCOPED_TRACE(config.describe());
    const Problem problem = make_problem(config.dtype, kSteps);
    const auto ours = leaves(problem.init);
    const auto theirs = leaves(problem.init);
    auto larssgd = make_larssgd(ours, larssgd_options(config));
    auto sgd = std::make_shared<torch::optim::SGD>(
        std::vector<OptimizerParamGroup>{
            OptimizerParamGroup({theirs[0], theirs[1]}), OptimizerParamGroup({theirs[2]})},
        sgd_options(config));
    lars::LARS reference(
        sgd, lars::LARSOptions()
                 .eps(kEps)
                 .trust_coef(kTrustCoef)
                 .clip(config.clip)
                 .trust_ratio(config.trust_ratio)
                 .excluded_param_groups({1}));
    for (int step = 0; step < kSteps; ++step) {
      set_grads(ours, problem.grads[step]);
      larssgd->step();
      // libtorch's SGD does not maximise: LARS gets the negated gradients instead.
      set_grads(theirs, problem.grads[step], config.maximize ? -1.0 : 1.0);
      reference.step();
      for (size_t i = 0; i < ours.size(); ++i) {
        ASSERT_TRUE(at::equal(ours[i], theirs[i])) << "parameter " << i << ", step " << step;
        EXPECT_TRUE(at::equal(ours[i].grad(), problem.grads[step][i])) << "the gradient is left as it is";
        const auto our_buffer = momentum_buffer(*larssgd, ours[i]);
        const auto their_buffer = momentum_buffer(*sgd, theirs[i]);
        ASSERT_EQ(our_buffer.defined(), their_buffer.defined());
        if (our_buffer.defined()) {
          ASSERT_TRUE(at::equal(our_buffer, their_buffer)) << "momentum buffer " << i << ", step " << step;
        }
      }
    }
    const auto our_ratios = larssgd->trust_ratios();
    const auto their_ratios = reference.trust_ratios();
    ASSERT_EQ(our_ratios.size(), 2u); // the excluded parameter has none
    ASSERT_EQ(their_ratios.size(), 2u);
    for (size_t i = 0; i < 2; ++i) {
      EXPECT_TRUE(our_ratios[i].first.is_same(ours[i]));
      EXPECT_EQ(our_ratios[i].second.dim(), 0);
      EXPECT_TRUE(at::equal(our_ratios[i].second, their_ratios[i].second));
    }
  }
}

TEST(LARSSGD, ClipClipsTheRatioOfSmallGradients) {
  // The guard of the test above: with clip, the small-gradient parameter's ratio is 1.
  const Problem problem = make_problem(at::kFloat, 1);
  const auto params = leaves(problem.init);
  auto optimizer = make_larssgd(params, LARSSGDOptions(kLr).trust_coef(kTrustCoef).clip(true));
  set_grads(params, problem.grads[0]);
  optimizer->step();
  const auto ratios = optimizer->trust_ratios();
  EXPECT_EQ(ratios[0].second.item<float>(), 1.0f);
  EXPECT_LT(ratios[1].second.item<float>(), 1.0f);
}

TEST(LARSSGD, ExcludedGroupsStepAsPlainSGD) {
  for (const auto& options : {SGDOptions(kLr).weight_decay(1e-2), SGDOptions(kLr).momentum(0.9).weight_decay(1e-2),
                              SGDOptions(kLr).momentum(0.9).dampening(0.3),
                              SGDOptions(kLr).momentum(0.9).nesterov(true).weight_decay(1e-2)}) {
    for (const auto dtype : {at::kFloat, at::kBFloat16}) {
      const Problem problem = make_problem(dtype, 3);
      const auto ours = leaves(problem.init);
      const auto theirs = leaves(problem.init);
      LARSSGD larssgd(
          ours, LARSSGDOptions(options.lr())
                    .momentum(options.momentum())
                    .dampening(options.dampening())
                    .nesterov(options.nesterov())
                    .weight_decay(options.weight_decay())
                    .lars_exclude(true));
      torch::optim::SGD sgd(theirs, options);
      for (const auto& grads : problem.grads) {
        set_grads(ours, grads);
        larssgd.step();
        set_grads(theirs, grads);
        sgd.step();
      }
      for (size_t i = 0; i < ours.size(); ++i) {
        EXPECT_TRUE(at::equal(ours[i], theirs[i])) << "momentum " << options.momentum() << " " << dtype;
      }
      EXPECT_TRUE(larssgd.trust_ratios().empty());
    }
  }
}

TEST(LARSSGD, MaximizeOfAnExcludedGroupNegatesTheGradient) {
  const Problem problem = make_problem(at::kFloat, 2);
  const auto ours = leaves(problem.init);
  const auto theirs = leaves(problem.init);
  LARSSGD larssgd(ours, LARSSGDOptions(kLr).momentum(0.9).weight_decay(1e-2).maximize(true).lars_exclude(true));
  torch::optim::SGD sgd(theirs, SGDOptions(kLr).momentum(0.9).weight_decay(1e-2));
  for (const auto& grads : problem.grads) {
    set_grads(ours, grads);
    larssgd.step();
    set_grads(theirs, grads, -1.0);
    sgd.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_TRUE(at::equal(ours[i], theirs[i]));
  }
}

TEST(LARSSGD, StepsFp64AndFp16) {
  for (const auto dtype : {at::kDouble, at::kHalf}) {
    const Problem problem = make_problem(dtype, 2);
    const auto ours = leaves(problem.init);
    const auto theirs = leaves(problem.init);
    auto larssgd = make_larssgd(ours, LARSSGDOptions(kLr).momentum(0.9).weight_decay(1e-2).trust_coef(kTrustCoef));
    auto sgd = std::make_shared<torch::optim::SGD>(
        std::vector<OptimizerParamGroup>{
            OptimizerParamGroup({theirs[0], theirs[1]}), OptimizerParamGroup({theirs[2]})},
        SGDOptions(kLr).momentum(0.9).weight_decay(1e-2));
    lars::LARS reference(sgd, lars::LARSOptions().trust_coef(kTrustCoef).excluded_param_groups({1}));
    for (const auto& grads : problem.grads) {
      set_grads(ours, grads);
      larssgd->step();
      set_grads(theirs, grads);
      reference.step();
    }
    for (size_t i = 0; i < ours.size(); ++i) {
      EXPECT_TRUE(at::equal(ours[i], theirs[i])) << dtype << " parameter " << i;
    }
  }
}

TEST(LARSSGD, ParamsTheFusedOperatorCannotStepGetTheSameRatiosAndSGD) {
  // complex64 is not among the fused operator's dtypes (nor are CUDA tensors): LARSSGD scales
  // a copy of their gradients, then steps SGD on them, as LARS over SGD does on that path.
  const std::vector<at::Tensor> init = {at::randn({4, 3}, at::kComplexFloat), at::randn({5}), at::randn({2}, at::kComplexFloat)};
  const auto ours = leaves(init);
  const auto theirs = leaves(init);
  auto larssgd = make_larssgd(ours, LARSSGDOptions(kLr).momentum(0.9).weight_decay(1e-2).trust_coef(kTrustCoef));
  auto sgd = std::make_shared<torch::optim::SGD>(
      std::vector<OptimizerParamGroup>{OptimizerParamGroup({theirs[0], theirs[1]}), OptimizerParamGroup({theirs[2]})},
      SGDOptions(kLr).momentum(0.9).weight_decay(1e-2));
  lars::LARS reference(sgd, lars::LARSOptions().trust_coef(kTrustCoef).excluded_param_groups({1}));
  for (int step = 0; step < 3; ++step) {
    const std::vector<at::Tensor> grads = {
        at::randn({4, 3}, at::kComplexFloat), at::randn({5}), at::randn({2}, at::kComplexFloat)};
    set_grads(ours, grads);
    larssgd->step();
    EXPECT_TRUE(at::equal(ours[0].grad(), grads[0])) << "the gradient is left as it is";
    set_grads(theirs, grads);
    reference.step();
  }
  for (size_t i = 0; i < ours.size(); ++i) {
    EXPECT_TRUE(at::allclose(ours[i], theirs[i], 1e-6, 1e-7)) << "parameter " << i;
  }
  const auto ratios = larssgd->trust_ratios();
  ASSERT_EQ(ratios.size(), 2u);
  const auto their_ratios = reference.trust_ratios();
  int compared = 0;
  for (const auto& [param, ratio] : ratios) {
    const size_t i = param.is_same(ours[0]) ? 0 : 1;
    for (const auto& [their_param, their_ratio] : their_ratios) {
      if (their_param.is_same(theirs[i])) {
        EXPECT_TRUE(at::allclose(ratio, their_ratio)) << "ratio " << i;
        ++compared;
      }
    }
  }
  EXPECT_EQ(compared, 2);
}

TEST(LARSSGD, StepEvaluatesTheClosureFirstWithGrad) {
  auto w = at::randn({3, 2}).requires_grad_(true);
  const auto before = w.detach().clone();
  LARSSGD optimizer(std::vector<at::Tensor>{w}, LARSSGDOptions(kLr).trust_coef(kTrustCoef));
  at::NoGradGuard no_grad; // the closure runs with grad enabled all the same
  const at::Tensor loss = optimizer.step([&] {
    auto value = (w * w).sum();
    value.backward();
    return value;
  });
  EXPECT_TRUE(at::allclose(loss, (before * before).sum()));
  EXPECT_TRUE(at::equal(w.grad(), 2 * before));
  EXPECT_FALSE(at::equal(w.detach(), before));
  EXPECT_FALSE(optimizer.step().defined()); // no closure, no loss
}

TEST(LARSSGD, IsAnOptimizerThatSchedulersDrive) {
  auto w = at::randn({3}).requires_grad_(true);
  LARSSGD optimizer(std::vector<at::Tensor>{w}, LARSSGDOptions(0.5).momentum(0.9));
  torch::optim::StepLR scheduler(optimizer, /*step_size=*/1, /*gamma=*/0.1);
  w.mutable_grad() = at::randn({3});
  optimizer.step();
  scheduler.step(); // libtorch's StepLR keeps the first epoch's rate
  scheduler.step();
  EXPECT_DOUBLE_EQ(optimizer.param_groups()[0].options().get_lr(), 0.05);
  EXPECT_DOUBLE_EQ(static_cast<LARSSGDOptions&>(optimizer.param_groups()[0].options()).lr(), 0.05);
  EXPECT_TRUE(optimizer.trust_ratios().size() == 1);
}

TEST(LARSSGD, ParamGroupsKeepTheirOwnOptions) {
  // libtorch's Optimizer::add_param_group would give a group of an unknown options type the defaults.
  auto w = at::randn({3}).requires_grad_(true);
  auto b = at::randn({2}).requires_grad_(true);
  auto c = at::randn({2}).requires_grad_(true);
  LARSSGD optimizer(
      {OptimizerParamGroup({w}), OptimizerParamGroup({b}, std::make_unique<LARSSGDOptions>(LARSSGDOptions(0.2).lars_exclude(true)))},
      LARSSGDOptions(0.5).momentum(0.9));
  optimizer.add_param_group(OptimizerParamGroup({c}, std::make_unique<LARSSGDOptions>(LARSSGDOptions(0.3).eps(1e-5))));
  const auto options = [&](size_t i) { return static_cast<LARSSGDOptions&>(optimizer.param_groups()[i].options()); };
  EXPECT_TRUE(options(0) == LARSSGDOptions(0.5).momentum(0.9));
  EXPECT_TRUE(options(1) == LARSSGDOptions(0.2).lars_exclude(true));
  EXPECT_TRUE(options(2) == LARSSGDOptions(0.3).eps(1e-5));
  EXPECT_TRUE(contains(
      error_of<c10::ValueError>([&] {
        optimizer.add_param_group(OptimizerParamGroup({at::randn({2}).requires_grad_(true)}, std::make_unique<LARSSGDOptions>(LARSSGDOptions(-1))));
      }),
      "param group 3"));
  EXPECT_EQ(optimizer.param_groups().size(), 3u);
}

// ---------------------------------------------------------------------------------------
// Options

TEST(LARSSGDOptions, DefaultsAndSetters) {
  const LARSSGDOptions defaults(0.1);
  EXPECT_EQ(defaults.lr(), 0.1);
  EXPECT_EQ(defaults.momentum(), 0);
  EXPECT_EQ(defaults.dampening(), 0);
  EXPECT_EQ(defaults.weight_decay(), 0);
  EXPECT_FALSE(defaults.nesterov());
  EXPECT_FALSE(defaults.maximize());
  EXPECT_EQ(defaults.eps(), 1e-8);
  EXPECT_EQ(defaults.trust_coef(), 1e-3);
  EXPECT_FALSE(defaults.clip());
  EXPECT_EQ(defaults.trust_ratio(), lars::TrustRatio::kPaper);
  EXPECT_FALSE(defaults.lars_exclude());
  EXPECT_EQ(LARSSGDOptions(0.1).trust_ratio("decayed").trust_ratio(), lars::TrustRatio::kDecayed);
  EXPECT_TRUE(contains(
      error_of<c10::ValueError>([] { LARSSGDOptions(0.1).trust_ratio("papers"); }), "lars::LARSSGDOptions"));
  LARSSGDOptions options(0.1);
  options.set_lr(0.3);
  EXPECT_EQ(options.get_lr(), 0.3);
}

TEST(LARSSGDOptions, SerializeBothWaysAndCompare) {
  const auto options = LARSSGDOptions(0.2)
                           .momentum(0.9)
                           .dampening(0.1)
                           .weight_decay(1e-4)
                           .maximize(true)
                           .eps(1e-6)
                           .trust_coef(0.01)
                           .clip(true)
                           .trust_ratio(lars::TrustRatio::kDecayed)
                           .lars_exclude(true);
  torch::serialize::OutputArchive written;
  options.serialize(written);
  std::stringstream bytes;
  written.save_to(bytes);
  torch::serialize::InputArchive read;
  read.load_from(bytes);
  LARSSGDOptions loaded(0);
  loaded.serialize(read);
  EXPECT_TRUE(loaded == options);
  EXPECT_FALSE(loaded == LARSSGDOptions(loaded).clip(false));
  EXPECT_FALSE(loaded == LARSSGDOptions(loaded).lars_exclude(false));
  EXPECT_FALSE(loaded == LARSSGDOptions(loaded).trust_ratio("paper"));
}

TEST(LARSSGDOptions, BadOptionsAreRefusedByName) {
  const auto w = at::randn({2}).requires_grad_(true);
  const auto refused = [&](const LARSSGDOptions& options) {
    return error_of<c10::ValueError>([&] { LARSSGD optimizer(std::vector<at::Tensor>{w}, options); });
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(contains(refused(LARSSGDOptions(-0.1)), "lr must be non-negative, got -0.1"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(nan)), "lr must be non-negative"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).momentum(-0.9)), "momentum must be non-negative"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).weight_decay(-1e-4)), "weight_decay must be non-negative"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).eps(-1)), "eps must be non-negative"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).trust_coef(nan)), "trust_coef must be non-negative"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).nesterov(true)), "nesterov needs a positive momentum"));
  EXPECT_TRUE(
      contains(refused(LARSSGDOptions(0.1).momentum(0.9).dampening(0.1).nesterov(true)), "and dampening 0"));
  const auto update = refused(LARSSGDOptions(0.1).trust_ratio("update"));
  EXPECT_TRUE(contains(update, "trust_ratio must be \"paper\" or \"decayed\", got \"update\""));
  EXPECT_TRUE(contains(update, "lars::LARS"));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(0.1).trust_ratio(lars::TrustRatio::kUpdate)), "got \"update\""));
  EXPECT_TRUE(contains(refused(LARSSGDOptions(-1)), "(the defaults)"));
  // A group's own options, named by the group.
  const auto group = error_of<c10::ValueError>([&] {
    LARSSGD optimizer(
        {OptimizerParamGroup({w}), OptimizerParamGroup({at::randn({2})}, std::make_unique<LARSSGDOptions>(LARSSGDOptions(0.1).eps(-1)))},
        LARSSGDOptions(0.1));
  });
  EXPECT_TRUE(contains(group, "param group 1"));
  EXPECT_TRUE(contains(group, "eps must be non-negative"));
  // Options of another optimizer.
  EXPECT_TRUE(contains(
      error_of<c10::TypeError>([&] {
        LARSSGD optimizer(
            {OptimizerParamGroup({w}, std::make_unique<SGDOptions>(SGDOptions(0.1)))}, LARSSGDOptions(0.1));
      }),
      "are not lars::LARSSGDOptions"));
}

TEST(LARSSGDOptions, OptionsChangedAfterConstructionAreCheckedAtTheStep) {
  auto w = at::randn({2}).requires_grad_(true);
  LARSSGD optimizer(std::vector<at::Tensor>{w}, LARSSGDOptions(0.1));
  static_cast<LARSSGDOptions&>(optimizer.param_groups()[0].options()).trust_coef(-1);
  w.mutable_grad() = at::randn({2});
  const auto before = w.detach().clone();
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { optimizer.step(); }), "trust_coef must be non-negative"));
  EXPECT_TRUE(at::equal(w, before));
}

TEST(LARSSGD, RefusesSparseGradientsBeforeWritingAnything) {
  auto w = at::randn({4, 3}).requires_grad_(true);
  auto e = at::randn({5, 3}).requires_grad_(true);
  LARSSGD optimizer(
      {OptimizerParamGroup({w}), OptimizerParamGroup({e})}, LARSSGDOptions(0.1).momentum(0.9).trust_coef(kTrustCoef));
  w.mutable_grad() = at::randn({4, 3});
  e.mutable_grad() = at::randn({5, 3}).to_sparse();
  const auto before = w.detach().clone();
  const auto message = error_of<c10::ValueError>([&] { optimizer.step(); });
  EXPECT_TRUE(contains(message, "does not support sparse gradients: parameter 0 of param group 1"));
  EXPECT_TRUE(contains(message, "lars_exclude"));
  EXPECT_TRUE(at::equal(w, before));
  EXPECT_TRUE(optimizer.state().empty());
}

// ---------------------------------------------------------------------------------------
// save / load

struct Run {
  std::vector<at::Tensor> params;
  std::unique_ptr<LARSSGD> optimizer;
};

const LARSSGDOptions kArchiveOptions =
    LARSSGDOptions(kLr).momentum(0.9).weight_decay(1e-3).eps(1e-6).trust_coef(kTrustCoef).clip(true);

Run make_run(const std::vector<at::Tensor>& init, const LARSSGDOptions& options) {
  Run run{leaves(init), nullptr};
  run.optimizer = make_larssgd(run.params, options);
  return run;
}

std::unique_ptr<torch::optim::SGD> make_plain(const std::vector<at::Tensor>& params) {
  return std::make_unique<torch::optim::SGD>(
      std::vector<OptimizerParamGroup>{OptimizerParamGroup({params[0], params[1]}), OptimizerParamGroup({params[2]})},
      SGDOptions(kLr).momentum(0.9).weight_decay(1e-3));
}

std::vector<at::Tensor> detached(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> values;
  for (const auto& param : params) {
    values.push_back(param.detach().clone());
  }
  return values;
}

TEST(LARSSGDArchive, SaveLoadContinuesIdentically) {
  const Problem problem = make_problem(at::kFloat, 4);
  auto first = make_run(problem.init, kArchiveOptions);
  for (int step = 0; step < 2; ++step) {
    set_grads(first.params, problem.grads[step]);
    first.optimizer->step();
  }
  std::stringstream saved;
  torch::save(*first.optimizer, saved);
  auto second = make_run(detached(first.params), LARSSGDOptions(1.0));
  torch::load(*second.optimizer, saved);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_TRUE(
        static_cast<LARSSGDOptions&>(second.optimizer->param_groups()[i].options()) ==
        static_cast<LARSSGDOptions&>(first.optimizer->param_groups()[i].options()));
  }
  for (int step = 2; step < 4; ++step) {
    for (auto* run : {&first, &second}) {
      set_grads(run->params, problem.grads[step]);
      run->optimizer->step();
    }
  }
  for (size_t i = 0; i < first.params.size(); ++i) {
    EXPECT_TRUE(at::equal(first.params[i], second.params[i])) << "parameter " << i;
  }
}

TEST(LARSSGDArchive, APlainSGDLoadsItAndContinuesAsExcludedGroups) {
  const Problem problem = make_problem(at::kFloat, 4);
  auto trained = make_run(problem.init, kArchiveOptions);
  for (int step = 0; step < 2; ++step) {
    set_grads(trained.params, problem.grads[step]);
    trained.optimizer->step();
  }
  std::stringstream archive;
  torch::save(*trained.optimizer, archive);
  const auto plain_params = leaves(detached(trained.params));
  auto plain = make_plain(plain_params);
  static_cast<SGDOptions&>(plain->param_groups()[0].options()).lr(1.0); // the archive's options replace these
  torch::load(*plain, archive);
  for (size_t i = 0; i < plain_params.size(); ++i) {
    ASSERT_TRUE(at::equal(momentum_buffer(*plain, plain_params[i]), momentum_buffer(*trained.optimizer, trained.params[i])))
        << "momentum buffer " << i;
  }
  for (size_t i = 0; i < 2; ++i) {
    const auto& sgd = static_cast<const SGDOptions&>(plain->param_groups()[i].options());
    EXPECT_EQ(sgd.lr(), kLr);
    EXPECT_EQ(sgd.momentum(), 0.9);
    EXPECT_EQ(sgd.weight_decay(), 1e-3);
    EXPECT_EQ(sgd.dampening(), 0);
    EXPECT_FALSE(sgd.nesterov());
  }
  // From here on, the plain SGD steps as the LARSSGD with every group excluded.
  for (auto& group : trained.optimizer->param_groups()) {
    static_cast<LARSSGDOptions&>(group.options()).lars_exclude(true);
  }
  for (int step = 2; step < 4; ++step) {
    set_grads(trained.params, problem.grads[step]);
    trained.optimizer->step();
    set_grads(plain_params, problem.grads[step]);
    plain->step();
  }
  for (size_t i = 0; i < plain_params.size(); ++i) {
    EXPECT_TRUE(at::equal(plain_params[i], trained.params[i])) << "parameter " << i;
  }
}

TEST(LARSSGDArchive, LoadsAPlainSGDArchiveKeepingItsLARSOptions) {
  const Problem problem = make_problem(at::kFloat, 3);
  auto trained = make_run(problem.init, kArchiveOptions);
  for (int step = 0; step < 2; ++step) {
    set_grads(trained.params, problem.grads[step]);
    trained.optimizer->step();
  }
  // Through a plain SGD, which has none of the LARS options.
  std::stringstream from_larssgd;
  torch::save(*trained.optimizer, from_larssgd);
  const auto plain_params = leaves(detached(trained.params));
  auto plain = make_plain(plain_params);
  torch::load(*plain, from_larssgd);
  std::stringstream from_plain;
  torch::save(*plain, from_plain);

  auto resumed = make_run(detached(plain_params), LARSSGDOptions(kArchiveOptions).lr(1.0).momentum(0.5));
  torch::load(*resumed.optimizer, from_plain);
  const auto& options = static_cast<LARSSGDOptions&>(resumed.optimizer->param_groups()[0].options());
  EXPECT_EQ(options.lr(), kLr); // SGD's fields from the archive
  EXPECT_EQ(options.momentum(), 0.9);
  EXPECT_EQ(options.trust_coef(), kTrustCoef); // the LARS ones kept
  EXPECT_TRUE(options.clip());
  EXPECT_TRUE(static_cast<LARSSGDOptions&>(resumed.optimizer->param_groups()[1].options()).lars_exclude());
  set_grads(trained.params, problem.grads[2]);
  trained.optimizer->step();
  set_grads(resumed.params, problem.grads[2]);
  resumed.optimizer->step();
  for (size_t i = 0; i < trained.params.size(); ++i) {
    EXPECT_TRUE(at::equal(trained.params[i], resumed.params[i])) << "parameter " << i;
  }
}

TEST(LARSSGDArchive, RefusesAnArchiveOfOtherGroupsWithNothingChanged) {
  const Problem problem = make_problem(at::kFloat, 1);
  auto trained = make_run(problem.init, kArchiveOptions);
  set_grads(trained.params, problem.grads[0]);
  trained.optimizer->step();
  std::stringstream archive;
  torch::save(*trained.optimizer, archive);
  auto other_params = leaves(problem.init);
  LARSSGD other(other_params, LARSSGDOptions(0.5));
  EXPECT_TRUE(contains(error_of<c10::ValueError>([&] { torch::load(other, archive); }), "param groups"));
  EXPECT_TRUE(other.state().empty());
  EXPECT_EQ(other.param_groups()[0].options().get_lr(), 0.5);
}

} // namespace
