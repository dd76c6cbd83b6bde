#include <lars/lars_sgd.h>

#include <lars/detail/param_groups.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/irange.h>
#include <torch/optim/serialize.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace lars {

LARSSGDOptions::LARSSGDOptions(double lr) : lr_(lr) {}

bool operator==(const LARSSGDOptions& lhs, const LARSSGDOptions& rhs) {
  return lhs.lr() == rhs.lr() && lhs.momentum() == rhs.momentum() && lhs.dampening() == rhs.dampening() &&
      lhs.weight_decay() == rhs.weight_decay() && lhs.nesterov() == rhs.nesterov() &&
      lhs.maximize() == rhs.maximize() && lhs.eps() == rhs.eps() && lhs.trust_coef() == rhs.trust_coef() &&
      lhs.clip() == rhs.clip() && lhs.trust_ratio() == rhs.trust_ratio() && lhs.lars_exclude() == rhs.lars_exclude();
}

void LARSSGDOptions::serialize(torch::serialize::OutputArchive& archive) const {
  // torch::optim::SGDOptions's fields, by its names and types: a plain SGD reads these.
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lr);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(dampening);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(weight_decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(nesterov);
  // LARSSGD's own, which a plain SGD skips.
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(maximize);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(eps);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(trust_coef);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(clip);
  archive.write("trust_ratio", std::string(trust_ratio_name(trust_ratio())));
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(lars_exclude);
}

void LARSSGDOptions::serialize(torch::serialize::InputArchive& archive) {
  c10::IValue value;
  const auto read_double = [&](const char* key, auto&& set) {
    if (archive.try_read(key, value)) {
      set(value.toDouble());
    }
  };
  const auto read_bool = [&](const char* key, auto&& set) {
    if (archive.try_read(key, value)) {
      set(value.toBool());
    }
  };
  read_double("lr", [this](double v) { lr(v); });
  read_double("momentum", [this](double v) { momentum(v); });
  read_double("dampening", [this](double v) { dampening(v); });
  read_double("weight_decay", [this](double v) { weight_decay(v); });
  read_bool("nesterov", [this](bool v) { nesterov(v); });
  read_bool("maximize", [this](bool v) { maximize(v); });
  read_double("eps", [this](double v) { eps(v); });
  read_double("trust_coef", [this](double v) { trust_coef(v); });
  read_bool("clip", [this](bool v) { clip(v); });
  if (archive.try_read("trust_ratio", value)) {
    trust_ratio(c10::string_view(value.toStringRef()));
  }
  read_bool("lars_exclude", [this](bool v) { lars_exclude(v); });
}

double LARSSGDOptions::get_lr() const {
  return lr();
}

void LARSSGDOptions::set_lr(const double lr) {
  this->lr(lr);
}

namespace {

using torch::optim::OptimizerParamGroup;
using torch::optim::SGDParamState;

// Python LARSSGD's checks, naming the option and where it was set ("the defaults" or a group).
void check_options(const LARSSGDOptions& options, const std::string& where) {
  const std::string who = "lars::LARSSGD (" + where + ")";
  // Written so that NaN is refused too.
  TORCH_CHECK_VALUE(options.lr() >= 0, who, ": lr must be non-negative, got ", options.lr());
  TORCH_CHECK_VALUE(options.momentum() >= 0, who, ": momentum must be non-negative, got ", options.momentum());
  TORCH_CHECK_VALUE(
      options.weight_decay() >= 0, who, ": weight_decay must be non-negative, got ", options.weight_decay());
  TORCH_CHECK_VALUE(
      !options.nesterov() || (options.momentum() > 0 && options.dampening() == 0), who,
      ": nesterov needs a positive momentum and dampening 0, got momentum ", options.momentum(), " and dampening ",
      options.dampening());
  detail::check_lars_options(options.eps(), options.trust_coef(), who.c_str());
  TORCH_CHECK_VALUE(
      options.trust_ratio() != TrustRatio::kUpdate, who,
      ": trust_ratio must be \"paper\" or \"decayed\", got \"update\"; the \"update\" ratio (LAMB) scales a "
      "base optimizer's step: use lars::LARS(base, lars::LARSOptions().trust_ratio(\"update\"))");
}

std::string group_name(size_t index) {
  return "param group " + std::to_string(index);
}

const LARSSGDOptions& options_of(const OptimizerParamGroup& group, size_t index) {
  return detail::options_of<LARSSGDOptions>(group, index, "lars::LARSSGD", "lars::LARSSGDOptions");
}

using State = ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>;

// One step of torch::optim::SGD over `params` with `grads` (its operations, so its numbers),
// and torch.optim.SGD's maximize; a first step's momentum buffer is the update itself.
void sgd_step(
    const std::vector<at::Tensor>& params,
    const std::vector<at::Tensor>& grads,
    double lr,
    double weight_decay,
    double momentum,
    double dampening,
    bool nesterov,
    bool maximize,
    State& state) {
  for (const auto j : c10::irange(params.size())) {
    const at::Tensor& param = params[j];
    at::Tensor update = maximize ? grads[j].neg() : grads[j];
    if (weight_decay != 0) {
      update = update.add(param, weight_decay);
    }
    if (momentum != 0) {
      auto& param_state = state[param.unsafeGetTensorImpl()];
      at::Tensor buffer;
      if (!param_state) {
        buffer = update.detach().clone();
        auto sgd_state = std::make_unique<SGDParamState>();
        sgd_state->momentum_buffer(buffer);
        param_state = std::move(sgd_state);
      } else {
        buffer = static_cast<SGDParamState&>(*param_state).momentum_buffer();
        buffer.mul_(momentum).add_(update, 1 - dampening);
      }
      update = nesterov ? update.add(buffer, momentum) : buffer;
    }
    param.add_(update, -lr);
  }
}

} // namespace

LARSSGD::LARSSGD(const std::vector<OptimizerParamGroup>& param_groups, LARSSGDOptions defaults)
    : Optimizer(std::vector<OptimizerParamGroup>{}, std::make_unique<LARSSGDOptions>(defaults)) {
  check_options(defaults, "the defaults");
  for (const auto& group : param_groups) {
    add_param_group(group);
  }
}

void LARSSGD::add_param_group(const OptimizerParamGroup& param_group) {
  const size_t index = param_groups_.size();
  if (param_group.has_options()) {
    check_options(options_of(param_group, index), group_name(index));
  }
  detail::add_param_group_with_options(*this, param_group);
}

torch::Tensor LARSSGD::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    at::AutoGradMode enable_grad(true);
    loss = closure();
  }
  // Every refusal comes before the first parameter is written.
  std::vector<const LARSSGDOptions*> options(param_groups_.size());
  std::vector<std::vector<at::Tensor>> params(param_groups_.size());
  std::vector<std::vector<at::Tensor>> grads(param_groups_.size());
  for (const auto i : c10::irange(param_groups_.size())) {
    options[i] = &options_of(param_groups_[i], i);
    check_options(*options[i], group_name(i));
    const auto& group_params = param_groups_[i].params();
    for (const auto j : c10::irange(group_params.size())) {
      const at::Tensor& param = group_params[j];
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) {
        continue;
      }
      if (!options[i]->lars_exclude()) { // an excluded group takes what torch::optim::SGD takes
        TORCH_CHECK_VALUE(
            !grad.is_sparse(), "lars::LARSSGD does not support sparse gradients: parameter ", j, " of param group ",
            i, " has one. Put it in a group with lars_exclude(true), or use a dense gradient.");
        TORCH_CHECK_VALUE(
            grad.sizes() == param.sizes() && grad.scalar_type() == param.scalar_type() &&
                grad.device() == param.device(),
            "lars::LARSSGD: the gradient of parameter ", j, " of param group ", i, " (", grad.scalar_type(),
            grad.sizes(), " on ", grad.device(), ") does not match the parameter (", param.scalar_type(),
            param.sizes(), " on ", param.device(), ")");
      }
      params[i].push_back(param);
      grads[i].push_back(grad);
    }
  }
  trust_ratios_.clear();
  at::NoGradGuard no_grad;
  for (const auto i : c10::irange(param_groups_.size())) {
    const LARSSGDOptions& group = *options[i];
    if (group.lars_exclude()) {
      sgd_step(
          params[i], grads[i], group.lr(), group.weight_decay(), group.momentum(), group.dampening(),
          group.nesterov(), group.maximize(), state_);
      continue;
    }
    // The parameters the fused operator steps, and the others.
    std::vector<at::Tensor> fused_params, fused_grads, other_params, other_grads;
    for (const auto j : c10::irange(params[i].size())) {
      const bool fused = detail::fused_step_supports({params[i][j]});
      (fused ? fused_params : other_params).push_back(params[i][j]);
      (fused ? fused_grads : other_grads).push_back(grads[i][j]);
    }
    if (!fused_params.empty()) {
      detail::fused_sgd_step(fused_params, fused_grads, group, state_, trust_ratios_);
    }
    // The others: the same ratios on copies of their gradients (the caller's stay as they
    // are), per device, then an SGD step without weight decay (it is in the scaled gradient).
    while (!other_params.empty()) {
      const c10::Device device = other_params[0].device();
      std::vector<at::Tensor> bucket_params, bucket_grads, rest_params, rest_grads;
      for (const auto j : c10::irange(other_params.size())) {
        const bool here = other_params[j].device() == device;
        (here ? bucket_params : rest_params).push_back(other_params[j]);
        at::Tensor grad = here ? (group.maximize() ? other_grads[j].neg() : other_grads[j].clone()) : other_grads[j];
        (here ? bucket_grads : rest_grads).push_back(std::move(grad));
      }
      at::Tensor ratios = at::empty({static_cast<int64_t>(bucket_params.size())}, at::TensorOptions(device).dtype(at::kFloat));
      lars_scale_gradients_(
          bucket_params, bucket_grads, group.weight_decay(), at::scalar_tensor(group.lr(), at::kDouble), group.eps(),
          group.trust_coef(), group.clip(), group.trust_ratio(), ratios);
      sgd_step(
          bucket_params, bucket_grads, group.lr(), /*weight_decay=*/0, group.momentum(), group.dampening(),
          group.nesterov(), /*maximize=*/false, state_);
      trust_ratios_.add(std::move(bucket_params), std::move(ratios));
      other_params = std::move(rest_params);
      other_grads = std::move(rest_grads);
    }
  }
  return loss;
}

void LARSSGD::save(torch::serialize::OutputArchive& archive) const {
  for (const auto i : c10::irange(param_groups_.size())) {
    options_of(param_groups_[i], i);
  }
  // torch::optim::SGD's own layout: its state type, and options that write SGD's fields.
  torch::optim::serialize<SGDParamState, LARSSGDOptions>(archive, *this);
}

// As torch::optim::serialize's load (serialize.h), except that each group's options are read
// into a copy of its current ones, so that a plain SGD archive keeps the LARS options; and
// everything is checked before anything changes.
void LARSSGD::load(torch::serialize::InputArchive& archive) {
  c10::IValue version;
  archive.read("pytorch_version", version);
  TORCH_CHECK_VALUE(
      version.isString() && version.toStringRef() == "1.5.0",
      "lars::LARSSGD: the archive is not an optimizer archive of libtorch's current format");
  torch::serialize::InputArchive state_archive;
  archive.read("state", state_archive);
  State saved_state;
  torch::optim::detail::serialize<SGDParamState>(state_archive, saved_state);

  torch::serialize::InputArchive groups_archive;
  archive.read("param_groups", groups_archive);
  at::Tensor size;
  groups_archive.read("param_groups/size", size);
  TORCH_CHECK_VALUE(
      size.item<int64_t>() == static_cast<int64_t>(param_groups_.size()), "lars::LARSSGD: the archive has ",
      size.item<int64_t>(), " param groups, the optimizer ", param_groups_.size());
  std::vector<std::vector<std::string>> saved_keys(param_groups_.size());
  std::vector<std::unique_ptr<LARSSGDOptions>> saved_options;
  for (const auto i : c10::irange(param_groups_.size())) {
    torch::serialize::InputArchive group_archive;
    groups_archive.read("param_groups/" + std::to_string(i), group_archive);
    group_archive.read("params/size", size);
    const int64_t num_params = size.item<int64_t>();
    TORCH_CHECK_VALUE(
        num_params == static_cast<int64_t>(param_groups_[i].params().size()), "lars::LARSSGD: ", group_name(i),
        " of the archive has ", num_params, " parameters, the optimizer's ", param_groups_[i].params().size());
    for (const auto j : c10::irange(num_params)) {
      c10::IValue key;
      group_archive.read("params/" + std::to_string(j), key);
      saved_keys[i].push_back(key.toStringRef());
    }
    torch::serialize::InputArchive options_archive;
    group_archive.read("options", options_archive);
    auto options = std::make_unique<LARSSGDOptions>(options_of(param_groups_[i], i));
    options->serialize(options_archive);
    check_options(*options, group_name(i) + " of the archive");
    saved_options.push_back(std::move(options));
  }
  for (const auto i : c10::irange(param_groups_.size())) {
    const auto& group_params = param_groups_[i].params();
    for (const auto j : c10::irange(group_params.size())) {
      // NOLINTNEXTLINE(performance-no-int-to-ptr)
      const auto saved = saved_state.find(reinterpret_cast<void*>(std::stoull(saved_keys[i][j])));
      if (saved != saved_state.end()) {
        state_[group_params[j].unsafeGetTensorImpl()] = std::move(saved->second);
      }
    }
    param_groups_[i].set_options(std::move(saved_options[i]));
  }
  trust_ratios_.clear();
}

} // namespace lars
