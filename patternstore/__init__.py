"""patternstore: specs, generators and a two-tier store of attention patterns.

The specs import without torch, so the command line parses its arguments and
prints its help without it; ``Pattern``, ``generate``, ``PatternStore`` and
``default_store`` need torch and are imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from .specs import DilatedSpec, SparseSpec, Spec, spec_from_dict

__all__ = ["DilatedSpec", "SparseSpec", "Spec", "Pattern", "generate", "spec_from_dict", "PatternStore", "default_store"]

_NEEDS_TORCH = {"Pattern": ".pattern", "generate": ".generate", "PatternStore": ".store", "default_store": ".store"}


def __getattr__(name: str) -> Any:
    if name not in _NEEDS_TORCH:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_NEEDS_TORCH[name], __name__), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """The package, whose ``generate`` is the function even after its module
    ``patternstore.generate`` is imported: the import system sets a loaded
    submodule as an attribute of its package, which eager imports used to
    overwrite at once and lazy ones cannot."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
