"""clipkit: contrastive image-text embeddings and cross-modal retrieval.

The names below load on first use, so that `from clipkit.index import Index` (vector search over an existing
index) opens without importing torch and the model libraries; `clipkit.encode` and `clipkit.search` are the
functions, as they always were, not their modules.
"""

from __future__ import annotations

import importlib
import types
import sys

__version__ = "0.1.0"
DEFAULT_MODEL = "clipkit-demo"  # the bundled, offline model: used wherever no model is named

_HOMES = {"encode": "clipkit.encode", "ClipkitError": "clipkit.errors", "Index": "clipkit.index",
          "recall_at_k": "clipkit.metrics", "Model": "clipkit.models", "list_models": "clipkit.models",
          "load_model": "clipkit.models", "Reranker": "clipkit.rerankers", "load_reranker": "clipkit.rerankers",
          "score_pairs": "clipkit.rerankers", "Hit": "clipkit.hit", "search": "clipkit.search",
          "search_batch": "clipkit.search"}
_SHADOWED = ("encode", "search")  # submodules named like the function they export

__all__ = ["ClipkitError", "Hit", "Index", "Model", "Reranker", "__version__", "encode", "list_models", "load_model",
           "load_reranker", "recall_at_k", "score_pairs", "search", "search_batch"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'clipkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            value = getattr(value, name)  # importing clipkit.search binds the function, not the module
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
