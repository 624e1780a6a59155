"""`RecordedModel`: the model an index records, standing in for it until it is first used.

An index records the model that built it (`Model.info`: name, weights, dimension, fingerprint). A run that may
embed nothing (`clipkit index` of a folder that has not changed, a Ray run whose actors load their own copy)
needs only that record; loading the model (and importing torch and open_clip for it) would be most of its
time. This module imports neither: the model is loaded when something other than the record is first asked
of it, through `clipkit.models.load_recorded_model`, which refuses weights that changed since.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

#: the record's own fields: answered without loading the model
_RECORDED = ("info", "name", "pretrained", "dim", "fingerprint", "vectors_per_image", "image_shape")


class RecordedModel:
    """Stands for the `clipkit.models.Model` that `info` records (on `device`, at `precision`): its record's
    fields are answered from `info`; any other attribute (`preprocess`, `encode_image`, `device`, ...) is the
    model's, loaded on first use. `clipkit.encode.as_model` and the index take it wherever they take a Model."""

    def __init__(self, info: dict | None, *, device=None, precision: str | None = None):
        if not info or not isinstance(info.get("name"), str):
            raise ValueError("this index records no model" + (f" by name ({info})" if info else "") +
                             "; pass model= (--model) to embed with, or search by vector")
        if device is not None:  # (a device asked for is checked now, not at the first image to embed)
            from clipkit.models import resolve_device

            device = resolve_device(device)
        object.__setattr__(self, "info", dict(info))
        object.__setattr__(self, "_options", {"device": device, "precision": precision})
        object.__setattr__(self, "_model", None)

    name = property(lambda self: self.info["name"])
    pretrained = property(lambda self: self.info.get("pretrained"))
    dim = property(lambda self: int(self.info["dim"]) if "dim" in self.info else self.loaded.dim)
    fingerprint = property(lambda self: self.info.get("fingerprint"))
    vectors_per_image = property(lambda self: int(self.info.get("vectors_per_image", 1)))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.vectors_per_image == 1 else (self.vectors_per_image, self.dim)

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def loaded(self):
        """The model itself (a `clipkit.models.Model`), loaded on first use."""
        if self._model is None:
            from clipkit.models import load_recorded_model

            logging.getLogger("clipkit").info("loading the index's model, %s (weights: %s), to embed what is new",
                                              self.name, self.pretrained or "bundled or none")
            object.__setattr__(self, "_model", load_recorded_model(self.info, **self._options))
        return self._model

    def __getattr__(self, name: str) -> Any:  # (only for what the record does not hold)
        if name.startswith("__") or name in ("_options", "_model"):
            raise AttributeError(name)
        return getattr(self.loaded, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RECORDED:
            raise AttributeError(f"{name} is the index's record of its model; load another model to change it")
        setattr(self.loaded, name, value)

    def __repr__(self) -> str:
        if self._model is not None:
            return repr(self._model)
        return f"RecordedModel(name={self.name!r}, pretrained={self.pretrained!r}, dim={self.dim}, not loaded yet)"


def names_the_record(info: dict | None, name: str | None, pretrained: str | None) -> bool:
    """Whether a model given by name (`clipkit index --model NAME --pretrained WEIGHTS`) is the one `info`
    records: the same name and weights (a local path compared where it leads). Then the record stands in for it
    (`RecordedModel`): loaded if something is to be embedded, its weights checked by their fingerprint then."""
    def same(given, recorded) -> bool:
        if given == recorded:
            return True
        return isinstance(given, str) and isinstance(recorded, str) and os.path.exists(given) \
            and str(Path(given).resolve()) == recorded

    return bool(info) and name is not None and same(name, info.get("name")) and same(pretrained, info.get("pretrained"))


def gone_paths(info: dict) -> list[str]:
    """The local files a model record names (its weights file, a transformers folder as its name) that are no
    longer there."""
    return [path for path in (info.get("name"), info.get("pretrained"))
            if isinstance(path, str) and os.path.isabs(path) and not os.path.exists(path)]


def weights_moved(recorded: dict, info: dict) -> bool:
    """Whether `info` is the `recorded` model (same fingerprint) loaded from other files, the recorded ones gone:
    a weights file (its `pretrained`) or a transformers folder (its `name`) moved."""
    if not info.get("fingerprint") or info.get("fingerprint") != recorded.get("fingerprint"):
        return False
    changed = [(recorded.get(key), info.get(key)) for key in ("name", "pretrained")
               if recorded.get(key) != info.get(key)]
    gone = gone_paths(recorded)
    return bool(changed) and all(old in gone and isinstance(new, str) and os.path.exists(new) for old, new in changed)
