// torchlars._C: liblars for Python; torchlars/cpp.py is its face. Loading this module also
// loads liblars, which registers the torch.ops.torchlars operators.

#include <lars/lamb.h>
#include <lars/lars.h>
#include <lars/lars_sgd.h>

#include <torch/csrc/utils/pybind.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// The keyword options of one param group, taken by name so that leftovers (misspelt, or
// meant for another base) are refused with the list of the options the base has. The
// names are libtorch's, except that the base's eps is "base_eps": "eps" is LARS's.
class KeywordOptions {
 public:
  KeywordOptions(std::string base, const py::dict& options)
      : base_(std::move(base)), remaining_(options.attr("copy")()) {}

  template <typename T>
  std::optional<T> take(const char* key) {
    names_ += (names_.empty() ? "" : ", ") + std::string(key);
    if (!remaining_.contains(key)) {
      return std::nullopt;
    }
    const py::object value = remaining_.attr("pop")(key);
    try {
      return value.cast<T>();
    } catch (const py::cast_error&) {
      TORCH_CHECK_TYPE(
          false, "torchlars.cpp.LARS: option '", key, "' of base '", base_, "' got ",
          py::repr(value).cast<std::string>(), ", which is not a ", kind<T>());
    }
  }

  template <typename T>
  T take_required(const char* key) {
    std::optional<T> value = take<T>(key);
    TORCH_CHECK_TYPE(value.has_value(), "torchlars.cpp.LARS: base '", base_, "' needs the option '", key, "'");
    return *value;
  }

  void check_all_taken() const {
    TORCH_CHECK_TYPE(
        remaining_.empty(), "torchlars.cpp.LARS: unknown option(s) ",
        py::repr(py::list(remaining_)).cast<std::string>(), " for base '", base_,
        "'; its options are ", names_);
  }

 private:
  template <typename T>
  static const char* kind() {
    if constexpr (std::is_same_v<T, bool>) {
      return "bool";
    } else if constexpr (std::is_same_v<T, double>) {
      return "float";
    } else {
      return "pair of floats";
    }
  }

  std::string base_;
  py::dict remaining_;
  std::string names_;
};

using Betas = std::tuple<double, double>;

torch::optim::SGDOptions sgd_options(KeywordOptions& options) {
  torch::optim::SGDOptions sgd(options.take_required<double>("lr"));
  if (auto momentum = options.take<double>("momentum")) sgd.momentum(*momentum);
  if (auto dampening = options.take<double>("dampening")) sgd.dampening(*dampening);
  if (auto weight_decay = options.take<double>("weight_decay")) sgd.weight_decay(*weight_decay);
  if (auto nesterov = options.take<bool>("nesterov")) sgd.nesterov(*nesterov);
  return sgd;
}

// AdamOptions and AdamWOptions have the same fields (and different defaults).
template <typename Options>
Options adam_options(KeywordOptions& options) {
  Options adam;
  if (auto lr = options.take<double>("lr")) adam.lr(*lr);
  if (auto betas = options.take<Betas>("betas")) adam.betas(*betas);
  if (auto eps = options.take<double>("base_eps")) adam.eps(*eps);
  if (auto weight_decay = options.take<double>("weight_decay")) adam.weight_decay(*weight_decay);
  if (auto amsgrad = options.take<bool>("amsgrad")) adam.amsgrad(*amsgrad);
  return adam;
}

torch::optim::RMSpropOptions rmsprop_options(KeywordOptions& options) {
  torch::optim::RMSpropOptions rmsprop;
  if (auto lr = options.take<double>("lr")) rmsprop.lr(*lr);
  if (auto alpha = options.take<double>("alpha")) rmsprop.alpha(*alpha);
  if (auto eps = options.take<double>("base_eps")) rmsprop.eps(*eps);
  if (auto weight_decay = options.take<double>("weight_decay")) rmsprop.weight_decay(*weight_decay);
  if (auto momentum = options.take<double>("momentum")) rmsprop.momentum(*momentum);
  if (auto centered = options.take<bool>("centered")) rmsprop.centered(*centered);
  return rmsprop;
}

torch::optim::AdagradOptions adagrad_options(KeywordOptions& options) {
  torch::optim::AdagradOptions adagrad;
  if (auto lr = options.take<double>("lr")) adagrad.lr(*lr);
  if (auto lr_decay = options.take<double>("lr_decay")) adagrad.lr_decay(*lr_decay);
  if (auto weight_decay = options.take<double>("weight_decay")) adagrad.weight_decay(*weight_decay);
  if (auto initial = options.take<double>("initial_accumulator_value")) {
    adagrad.initial_accumulator_value(*initial);
  }
  if (auto eps = options.take<double>("base_eps")) adagrad.eps(*eps);
  return adagrad;
}

// (params, options) of one param group; the options are complete (defaults already merged).
using ParamGroup = std::pair<std::vector<at::Tensor>, py::dict>;

template <typename Base, typename Options>
std::shared_ptr<torch::optim::Optimizer> make_base(
    const std::string& name,
    const std::vector<ParamGroup>& groups,
    const py::dict& defaults,
    Options (*parse)(KeywordOptions&)) {
  KeywordOptions default_options(name, defaults);
  const Options base_defaults = parse(default_options);
  default_options.check_all_taken();
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  std::vector<Options> group_options;
  for (const auto& [params, options] : groups) {
    KeywordOptions keyword_options(name, options);
    group_options.push_back(parse(keyword_options));
    keyword_options.check_all_taken();
    param_groups.emplace_back(params);
  }
  auto base = std::make_shared<Base>(param_groups, base_defaults);
  // Set, not passed to the constructor, which would merge each group's options with the
  // defaults (an explicit weight_decay=0 would inherit the default's).
  for (const auto i : c10::irange(group_options.size())) {
    base->param_groups()[i].set_options(std::make_unique<Options>(group_options[i]));
  }
  return base;
}

std::shared_ptr<torch::optim::Optimizer> make_base(
    const std::string& name, const std::vector<ParamGroup>& groups, const py::dict& defaults) {
  namespace optim = torch::optim;
  if (name == "sgd") {
    return make_base<optim::SGD>(name, groups, defaults, &sgd_options);
  }
  if (name == "adam") {
    return make_base<optim::Adam>(name, groups, defaults, &adam_options<optim::AdamOptions>);
  }
  if (name == "adamw") {
    return make_base<optim::AdamW>(name, groups, defaults, &adam_options<optim::AdamWOptions>);
  }
  if (name == "rmsprop") {
    return make_base<optim::RMSprop>(name, groups, defaults, &rmsprop_options);
  }
  if (name == "adagrad") {
    return make_base<optim::Adagrad>(name, groups, defaults, &adagrad_options);
  }
  TORCH_CHECK_VALUE(
      false, "torchlars.cpp.LARS: base must be one of 'sgd', 'adam', 'adamw', 'rmsprop', "
      "'adagrad', got '", name, "'");
}

// A liblars optimizer behind a lock. step() and zero_grad() release the GIL, so without it two
// Python threads could step one optimizer at once and race on its gradients, state and param
// groups. torchlars.cpp.LARS, torchlars.cpp.LARSSGD and torchlars.cpp.LAMB are this, around
// lars::LARS, lars::LARSSGD and lars::LAMB.
template <typename Optimizer>
class Locked {
 public:
  explicit Locked(std::unique_ptr<Optimizer> optimizer) : optimizer_(std::move(optimizer)) {}

  void step() {
    const std::lock_guard<std::mutex> lock(mutex_);
    optimizer_->step();
  }

  void zero_grad(bool set_to_none) {
    const std::lock_guard<std::mutex> lock(mutex_);
    optimizer_->zero_grad(set_to_none);
  }

  // {parameter: 0-dim fp32 tensor}, as torchlars.LARS.trust_ratios() gives it.
  py::dict trust_ratios() {
    const std::lock_guard<std::mutex> lock(mutex_);
    py::dict ratios;
    for (const auto& [param, ratio] : optimizer_->trust_ratios()) {
      ratios[py::cast(param)] = py::cast(ratio);
    }
    return ratios;
  }

  // What a step never changes (a lars::LARS's options, set at construction): read without the lock.
  const Optimizer& unlocked() const { return *optimizer_; }

  // What `read` returns from the optimizer, read under the lock.
  template <typename Read>
  auto read(const Read& read) {
    const std::lock_guard<std::mutex> lock(mutex_);
    return read(*optimizer_);
  }

 private:
  std::mutex mutex_;
  std::unique_ptr<Optimizer> optimizer_;
};

using LockedLAMB = Locked<lars::LAMB>;
using LockedLARS = Locked<lars::LARS>;
using LockedLARSSGD = Locked<lars::LARSSGD>;

// The options of one lars::LARSSGD param group, from the complete dict torchlars/cpp.py
// builds (its keys and their types checked there).
lars::LARSSGDOptions larssgd_options(const py::dict& options) {
  const auto get = [&](const char* key) { return options[key]; };
  return lars::LARSSGDOptions(get("lr").cast<double>())
      .momentum(get("momentum").cast<double>())
      .dampening(get("dampening").cast<double>())
      .weight_decay(get("weight_decay").cast<double>())
      .nesterov(get("nesterov").cast<bool>())
      .maximize(get("maximize").cast<bool>())
      .eps(get("eps").cast<double>())
      .trust_coef(get("trust_coef").cast<double>())
      .clip(get("clip").cast<bool>())
      .trust_ratio(lars::parse_trust_ratio(get("trust_ratio").cast<std::string>(), "torchlars.cpp.LARSSGD"))
      .lars_exclude(get("lars_exclude").cast<bool>());
}

py::dict larssgd_group_dict(const torch::optim::OptimizerParamGroup& group) {
  const auto& options = static_cast<const lars::LARSSGDOptions&>(group.options());
  py::dict dict;
  dict["params"] = py::cast(group.params());
  dict["lr"] = options.lr();
  dict["momentum"] = options.momentum();
  dict["dampening"] = options.dampening();
  dict["weight_decay"] = options.weight_decay();
  dict["nesterov"] = options.nesterov();
  dict["maximize"] = options.maximize();
  dict["eps"] = options.eps();
  dict["trust_coef"] = options.trust_coef();
  dict["clip"] = options.clip();
  dict["trust_ratio"] = lars::trust_ratio_name(options.trust_ratio());
  dict["lars_exclude"] = options.lars_exclude();
  return dict;
}

// A lars::LARSSGD from torchlars/cpp.py's param groups and defaults.
std::unique_ptr<lars::LARSSGD> make_larssgd(const std::vector<ParamGroup>& groups, const py::dict& defaults) {
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  for (const auto& [params, options] : groups) {
    param_groups.emplace_back(params, std::make_unique<lars::LARSSGDOptions>(larssgd_options(options)));
  }
  return std::make_unique<lars::LARSSGD>(param_groups, larssgd_options(defaults));
}

// The options of one lars::LAMB param group, from the complete dict torchlars/cpp.py builds
// (its keys and their types checked there).
lars::LAMBOptions lamb_options(const py::dict& options) {
  const auto get = [&](const char* key) { return options[key]; };
  const py::object max_grad_norm = get("max_grad_norm");
  return lars::LAMBOptions(get("lr").cast<double>())
      .betas(get("betas").cast<Betas>())
      .eps(get("eps").cast<double>())
      .weight_decay(get("weight_decay").cast<double>())
      .trust_coef(get("trust_coef").cast<double>())
      .trust_eps(get("trust_eps").cast<double>())
      .trust_clip(get("trust_clip").cast<bool>())
      .always_adapt(get("always_adapt").cast<bool>())
      .bias_correction(get("bias_correction").cast<bool>())
      .max_grad_norm(max_grad_norm.is_none() ? std::nullopt : std::optional<double>(max_grad_norm.cast<double>()))
      .maximize(get("maximize").cast<bool>())
      .lars_exclude(get("lars_exclude").cast<bool>());
}

py::dict lamb_group_dict(const torch::optim::OptimizerParamGroup& group) {
  const auto& options = static_cast<const lars::LAMBOptions&>(group.options());
  py::dict dict;
  dict["params"] = py::cast(group.params());
  dict["lr"] = options.lr();
  dict["betas"] = py::cast(options.betas());
  dict["eps"] = options.eps();
  dict["weight_decay"] = options.weight_decay();
  dict["trust_coef"] = options.trust_coef();
  dict["trust_eps"] = options.trust_eps();
  dict["trust_clip"] = options.trust_clip();
  dict["always_adapt"] = options.always_adapt();
  dict["bias_correction"] = options.bias_correction();
  dict["max_grad_norm"] = options.max_grad_norm() ? py::cast(*options.max_grad_norm()) : py::none();
  dict["maximize"] = options.maximize();
  dict["lars_exclude"] = options.lars_exclude();
  return dict;
}

std::unique_ptr<lars::LAMB> make_lamb(const std::vector<ParamGroup>& groups, const py::dict& defaults) {
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  for (const auto& [params, options] : groups) {
    param_groups.emplace_back(params, std::make_unique<lars::LAMBOptions>(lamb_options(options)));
  }
  return std::make_unique<lars::LAMB>(param_groups, lamb_options(defaults));
}

} // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "liblars, the C++ LARS optimizer; use it through torchlars.cpp";

  // c10 errors as the Python exceptions they stand for, without C++ backtraces.
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) {
        std::rethrow_exception(error);
      }
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  py::class_<LockedLARS>(m, "LARS")
      .def(
          py::init([](const std::vector<ParamGroup>& groups,
                      const std::string& base,
                      const py::dict& base_defaults,
                      double eps,
                      double trust_coef,
                      bool clip,
                      const std::string& trust_ratio,
                      std::vector<size_t> excluded_param_groups) {
            return std::make_unique<LockedLARS>(std::make_unique<lars::LARS>(
                make_base(base, groups, base_defaults),
                lars::LARSOptions()
                    .eps(eps)
                    .trust_coef(trust_coef)
                    .clip(clip)
                    .trust_ratio(lars::parse_trust_ratio(trust_ratio, "torchlars.cpp.LARS"))
                    .excluded_param_groups(std::move(excluded_param_groups))));
          }),
          py::arg("param_groups"),
          py::arg("base"),
          py::arg("base_defaults"),
          py::arg("eps"),
          py::arg("trust_coef"),
          py::arg("clip"),
          py::arg("trust_ratio"),
          py::arg("excluded_param_groups"))
      .def("trust_ratios", &LockedLARS::trust_ratios)
      .def("step", &LockedLARS::step, py::call_guard<py::gil_scoped_release>())
      .def(
          "zero_grad",
          &LockedLARS::zero_grad,
          py::arg("set_to_none") = true,
          py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("eps", [](const LockedLARS& self) { return self.unlocked().options().eps(); })
      .def_property_readonly("trust_coef", [](const LockedLARS& self) { return self.unlocked().options().trust_coef(); })
      .def_property_readonly("clip", [](const LockedLARS& self) { return self.unlocked().options().clip(); })
      .def_property_readonly("trust_ratio", [](const LockedLARS& self) {
        return lars::trust_ratio_name(self.unlocked().options().trust_ratio());
      });

  py::class_<LockedLARSSGD>(m, "LARSSGD")
      .def(
          py::init([](const std::vector<ParamGroup>& groups, const py::dict& defaults) {
            return std::make_unique<LockedLARSSGD>(make_larssgd(groups, defaults));
          }),
          py::arg("param_groups"),
          py::arg("defaults"))
      .def("step", &LockedLARSSGD::step, py::call_guard<py::gil_scoped_release>())
      .def(
          "zero_grad",
          &LockedLARSSGD::zero_grad,
          py::arg("set_to_none") = true,
          py::call_guard<py::gil_scoped_release>())
      // A copy: [{"params": [...], "lr": ..., ...}], torch.optim's param_groups as of now.
      .def(
          "param_groups",
          [](LockedLARSSGD& self) {
            return self.read([](const lars::LARSSGD& optimizer) {
              py::list groups;
              for (const auto& group : optimizer.param_groups()) {
                groups.append(larssgd_group_dict(group));
              }
              return groups;
            });
          })
      .def("trust_ratios", &LockedLARSSGD::trust_ratios);

  py::class_<LockedLAMB>(m, "LAMB")
      .def(
          py::init([](const std::vector<ParamGroup>& groups, const py::dict& defaults) {
            return std::make_unique<LockedLAMB>(make_lamb(groups, defaults));
          }),
          py::arg("param_groups"),
          py::arg("defaults"))
      .def("step", &LockedLAMB::step, py::call_guard<py::gil_scoped_release>())
      .def(
          "zero_grad",
          &LockedLAMB::zero_grad,
          py::arg("set_to_none") = true,
          py::call_guard<py::gil_scoped_release>())
      .def(
          "param_groups",
          [](LockedLAMB& self) {
            return self.read([](const lars::LAMB& optimizer) {
              py::list groups;
              for (const auto& group : optimizer.param_groups()) {
                groups.append(lamb_group_dict(group));
              }
              return groups;
            });
          })
      .def("trust_ratios", &LockedLAMB::trust_ratios);
}
