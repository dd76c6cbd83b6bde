"""torchlars: Layer-wise Adaptive Rate Scaling (LARS) for PyTorch, in Python and C++."""

from torchlars.lamb import LAMB
from torchlars.lars import LARS, exclude_bias_and_norm, named_trust_ratios
from torchlars.lars_sgd import LARSSGD

__all__ = ["LAMB", "LARS", "LARSSGD", "exclude_bias_and_norm", "named_trust_ratios", "__version__"]
__version__ = "0.2.0"


def __getattr__(name: str):
    # The C++ pieces load on first use, so the pure-Python package works without them.
    if name in ("cpp", "ops"):
        import importlib

        return importlib.import_module(f"torchlars.{name}")
    if name == "cmake_prefix_path":
        return _cmake_prefix_path()
    raise AttributeError(f"module 'torchlars' has no attribute {name!r}")


def _cmake_prefix_path() -> str:
    """The CMAKE_PREFIX_PATH entry under which find_package(lars) finds the installed liblars.

    pip installs liblars next to the extension module torchlars._C, wherever that is (an
    editable install keeps the Python sources elsewhere).
    """
    import importlib.util
    import os

    extension = importlib.util.find_spec("torchlars._C")
    if extension is None or extension.origin is None:
        raise AttributeError(
            "torchlars.cmake_prefix_path: liblars is not installed with this torchlars "
            "(running from the source tree?); install the package with "
            "`pip install --no-build-isolation .`"
        )
    return os.path.dirname(extension.origin)
