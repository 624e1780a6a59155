"""`search()`: a query (text, image or vector) -> embedding -> index -> hits."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from clipkit.encode import IMAGE, TEXT, encode_images, encode_texts
from clipkit.index import Index


@dataclass
class Hit:
    """One search result: the item's id, its similarity score, its file path (if any) and metadata."""

    id: Any
    score: float
    path: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "path": self.path, "metadata": self.metadata}


def query_kind(query: Any) -> str:
    """TEXT, IMAGE or 'vector' for a single query; anything else is a ValueError."""
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("the text query is empty")
        return TEXT
    if isinstance(query, (Image.Image, os.PathLike)):
        return IMAGE
    if isinstance(query, np.ndarray):
        if query.ndim == 1:
            return "vector"
        if query.ndim in (2, 3) and query.dtype == np.uint8:
            return IMAGE
        raise ValueError(f"an array query must be a 1-D embedding or an HxWx3 uint8 image, got shape "
                         f"{query.shape} dtype {query.dtype}")
    raise ValueError(f"unsupported query type {type(query).__name__}: pass a str (text), a PIL image, "
                     "a pathlib.Path, an HxWx3 uint8 array, or a 1-D embedding")


def embed_query(query: Any, index: Index, model=None) -> np.ndarray:
    """The query's unit-norm embedding, made by the index's model (or a checked `model`)."""
    kind = query_kind(query)
    if kind == "vector":
        return np.asarray(query, dtype=np.float32)
    model = index.resolve_model(model)
    if kind == TEXT:
        return encode_texts([query], model)[0]
    return encode_images([query], model)[0]


def search(query: Any, index: Index, k: int = 10, *, model=None) -> list[Hit]:
    """Top-k hits for one query, best first.

    `query`: str -> text; PIL image / Path / HxWx3 uint8 array -> image; 1-D array -> embedding.
    `model=None` uses the index's own model; another model is checked against the one that built it.
    """
    if not isinstance(index, Index):
        raise ValueError(f"index must be a clipkit.Index, got {type(index).__name__}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    vector = embed_query(query, index, model)
    scores, ids = index.search(vector[None, :], k)
    records = index.get(ids[0].tolist())
    return [Hit(id=record.pop("id"), score=float(score), path=record.pop("path", None), metadata=record)
            for score, record in zip(scores[0], records)]
