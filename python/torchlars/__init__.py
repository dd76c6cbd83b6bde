"""torchlars: Layer-wise Adaptive Rate Scaling (LARS) for PyTorch, in Python and C++."""

from torchlars.lars import LARS, exclude_bias_and_norm

__all__ = ["LARS", "exclude_bias_and_norm", "__version__"]
__version__ = "0.2.0"
