"""``torchlars._C``, the C++ extension (liblars and its operators), or a clear error.

``torchlars.cpp`` and ``torchlars.ops`` load it, through here; ``import torchlars`` loads
``torchlars.ops`` where the extension is installed, for the fused CPU step.
"""

try:
    from torchlars import _C
except ImportError as error:
    raise ImportError(
        f"torchlars: the C++ extension torchlars._C does not load ({error}): running from the source "
        "tree, or built against another torch? Install (or rebuild) the package against this torch "
        "with `pip install --no-build-isolation .`"
    ) from error

__all__ = ["_C"]
