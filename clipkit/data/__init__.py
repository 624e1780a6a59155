"""Data: image reading, folder scanning, the synthetic data set, webdataset shards, caption files.

The names below load on first use: scanning a folder or reading an image needs neither torch nor the
training loader.
"""

from __future__ import annotations

import importlib

_HOMES = {"RetrievalSet": "captions", "read_karpathy": "captions", "synthetic_set": "captions",
          "IMAGE_EXTENSIONS": "folder", "scan_images": "folder", "decode_image": "images", "read_image": "images",
          "make_loader": "loader", "Sample": "shards", "samples_from_folder": "shards",
          "samples_from_table": "shards", "write_shards": "shards", "write_synthetic": "synthetic"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'clipkit.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"clipkit.data.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
