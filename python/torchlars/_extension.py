"""``torchlars._C``, the C++ extension (liblars and its operators), or a clear error.

``torchlars.cpp`` and ``torchlars.ops`` load it, through here; ``import torchlars`` loads
``torchlars.ops`` where the extension is installed, for the fused CPU step.
"""

try:
    from torchlars import _C
except ImportError as error:
    raise ImportError(
        "torchlars: the C++ extension torchlars._C is not available (running from the source "
        "tree?); install the package with `pip install --no-build-isolation .`"
    ) from error

__all__ = ["_C"]
