"""``torchlars._C``, the C++ extension (liblars and its operators), or a clear error.

``import torchlars`` never loads it; ``torchlars.cpp``, ``torchlars.ops`` and
``LARS(..., backend="cpp")`` do, through here.
"""

try:
    from torchlars import _C
except ImportError as error:
    raise ImportError(
        "torchlars: the C++ extension torchlars._C is not available (running from the source "
        "tree?); install the package with `pip install --no-build-isolation .`"
    ) from error

__all__ = ["_C"]
