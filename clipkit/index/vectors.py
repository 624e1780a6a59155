"""Checking what goes into an index: vectors (finite, non-zero, unit length) and item ids."""

from __future__ import annotations

from typing import Any

import numpy as np


def from_tensor(value: Any) -> Any:
    """A torch tensor (any device, float16/bfloat16 too) as a numpy array, as open_clip's `encode_image` returns
    embeddings; anything else as it is. (torch is not imported for it.)"""
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()  # (numpy has no bfloat16)
        return value.numpy()
    return value


def prepare_items(vectors: Any, dim: int, per_item: int, what: str = "embeddings") -> np.ndarray:
    """Items of `per_item` vectors each: a (N, per_item, dim) array (or (per_item, dim) for one item) as
    (N, per_item * dim) rows of unit vectors side by side (each vector normalised on its own)."""
    if per_item == 1:
        return prepare_vectors(vectors, dim, what)
    try:
        array = np.asarray(from_tensor(vectors))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array: {exc}") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (per_item, dim):
        raise ValueError(f"{what} must be (N, {per_item}, {dim}): this index keeps {per_item} vectors of {dim} "
                         f"numbers an item; got shape {array.shape}")
    flat = prepare_vectors(array.reshape(-1, dim), dim, what)
    return np.ascontiguousarray(flat.reshape(len(array), per_item * dim))


def prepare_vectors(vectors: Any, dim: int, what: str = "embeddings") -> np.ndarray:
    """Validate a (N, dim) or (dim,) array and return unit-norm float32 rows (always 2-D).

    The norm is taken in float64 after scaling each row by its largest magnitude, so rows of any
    finite size (1e-30 or 1e30) keep their direction; NaN, infinite and all-zero rows are refused.
    """
    vectors = from_tensor(vectors)
    if isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.ndim == 2 and \
            vectors.shape[1] == dim:
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
        if norms.size and np.all((norms > 1e-15) & (norms < 1e15)):  # the common case, exact in float32 (and fast)
            return np.ascontiguousarray(vectors / norms[:, None])
    try:
        array = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{what} must be a numeric array: {exc}") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, {dim}), got shape {array.shape}")
    if array.shape[1] != dim:
        raise ValueError(f"{what}: dimension {array.shape[1]}, but the index's is {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: NaN or infinite values")
    scale = np.abs(array).max(axis=1, keepdims=True) if array.size else np.ones((len(array), 1))
    if (scale == 0).any():
        raise ValueError(f"{what}: an all-zero vector, which has no direction to search by")
    scaled = array / scale
    unit = scaled / np.linalg.norm(scaled, axis=1, keepdims=True)
    return np.ascontiguousarray(unit, dtype=np.float32)


def in_sorted(values: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Which of `values` are in `sorted_keys` (sorted): a binary search each, where np.isin sorts both arrays
    on every call (a million removed keys, checked batch after batch, cost seconds a search)."""
    values = np.asarray(values)
    if not len(sorted_keys):
        return np.zeros(values.shape, bool)
    positions = np.searchsorted(sorted_keys, values)
    return sorted_keys[np.minimum(positions, len(sorted_keys) - 1)] == values


def add_sorted(sorted_keys: np.ndarray, keys) -> tuple[np.ndarray, int]:
    """(`sorted_keys` (sorted, unique) with `keys` merged in, how many of them were not there): one merge, where
    np.union1d sorts the whole set again (a removal at a time, a million removed keys: minutes)."""
    keys = np.unique(np.asarray(keys, np.int64))
    fresh = keys[~in_sorted(keys, sorted_keys)]
    return np.insert(sorted_keys, np.searchsorted(sorted_keys, fresh), fresh), len(fresh)


def damaged_rows(vectors: np.ndarray, per_item: int = 1) -> np.ndarray:
    """Which stored rows are damaged (NaN, infinite or a vector far from unit length: flipped bytes on disk);
    a row holds `per_item` vectors side by side."""
    if not len(vectors):
        return np.zeros(0, bool)
    parts = vectors.reshape(len(vectors), per_item, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.einsum("ijk,ijk->ij", parts, parts)
    return ~(np.abs(norms - 1) < 1e-2).all(axis=1)


def normalize_id(value: Any) -> int | str:
    """An item id as stored: an int or a str (numpy integers become ints; anything else is refused)."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"ids must be int or str, got bool {value!r}")
    if isinstance(value, (int, np.integer)):
        if not -2**63 <= int(value) < 2**63:
            raise ValueError(f"integer ids must fit in 64 bits (SQLite's integers), got {value}: use a str id")
        return int(value)
    if isinstance(value, str):
        if not value.isascii() and not storable(value):
            raise ValueError(f"ids must be valid UTF-8 text, got {value!r} (a file name with undecodable bytes: "
                             "rename the file)")
        return value
    raise ValueError(f"ids must be int or str, got {type(value).__name__} {value!r}")


def storable(text: str) -> bool:
    """Whether a str can be stored as text (UTF-8 in SQLite): not a name with undecodable bytes (which Python
    holds as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def id_list(ids: Any) -> list:
    """Ids as stored, from an iterable of them; one id alone is refused (a URL or path would otherwise be read
    letter by letter, each letter an id)."""
    if isinstance(ids, (str, bytes, int, np.integer)):
        raise ValueError(f"expected a list of ids, got one {type(ids).__name__} {ids!r}: pass [{ids!r}]")
    return [normalize_id(v) for v in ids]


def ids_array(values: list) -> np.ndarray:
    """int64 when every id is an int, else an object array (ids as given, None for no item)."""
    if values and all(isinstance(v, int) for v in values):
        return np.asarray(values, dtype=np.int64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def keys_sum(keys: np.ndarray) -> int:
    """An order-free digest of a set of integer keys that changes can update (add the added keys' sum, take
    away the removed ones'): the sum, modulo 2^64, of a well-mixed hash of each key (splitmix64's finaliser).
    What a FAISS file must have been saved for, checked on opening without reading every key."""
    with np.errstate(over="ignore"):
        x = np.asarray(keys, dtype=np.int64).astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
        return int(x.sum(dtype=np.uint64))
