#pragma once

// What liblars's optimizers built from params (lars::LARSSGD, lars::LAMB) share about their
// param groups, whose options are their own type. Not API.

#include <c10/util/Exception.h>
#include <torch/optim/optimizer.h>

#include <cstddef>

namespace lars::detail {

/// The options of param group `index` (of optimizer `who`), which must be `Options`:
/// libtorch's add_param_group takes any. `options_name` names `Options` in the error.
template <typename Options>
const Options& options_of(
    const torch::optim::OptimizerParamGroup& group, size_t index, const char* who, const char* options_name) {
  TORCH_CHECK_TYPE(group.has_options(), who, ": param group ", index, " has no options");
  const auto* options = dynamic_cast<const Options*>(&group.options());
  TORCH_CHECK_TYPE(
      options != nullptr, who, ": the options of param group ", index, " are not ", options_name,
      "; add param groups with ", options_name, " or none (the defaults)");
  return *options;
}

/// Adds `param_group` to `optimizer` with its own options, kept as they are, or none (then the
/// defaults). libtorch's add_param_group checks the params and gives the group the defaults: it
/// merges a group's own options with those only for libtorch's optimizers.
inline void add_param_group_with_options(
    torch::optim::Optimizer& optimizer, const torch::optim::OptimizerParamGroup& param_group) {
  optimizer.torch::optim::Optimizer::add_param_group(torch::optim::OptimizerParamGroup(param_group.params()));
  if (param_group.has_options()) {
    optimizer.param_groups().back().set_options(param_group.options().clone());
  }
}

} // namespace lars::detail
