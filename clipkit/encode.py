"""Batched, type-dispatched encoding of texts and images into unit-norm float32 numpy arrays."""

from __future__ import annotations

import collections
import os
import warnings
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from clipkit._progress import progress_bar
from clipkit.data.folder import is_image_name
from clipkit.data.images import ImageURL, TarMember, decode_image, failure_kind, read_image, to_rgb
from clipkit.itm import image_states
from clipkit.models import Model, load_model
from clipkit.recorded import RecordedModel

TEXT, IMAGE = "text", "image"
IMAGE_TYPES = (Image.Image, os.PathLike, bytes, bytearray)  # what is one image (bytes: an image file's), not a list


def default_workers(device: torch.device | str | None = None) -> int:
    """Image decoding threads. For a model on the CPU only the cores its own threads leave free, up to 8 (0:
    decode inline), since decoding threads there would take cores from the forward pass. For a GPU every core
    but the one feeding it, up to 32: the GPU embeds faster than a few threads decode (JPEG decoding and
    resizing release the GIL), as a Ray actor on a GPU gets its node's share of CPUs."""
    cores = os.cpu_count() or 1
    if device is not None and torch.device(device).type == "cpu":
        return max(0, min(8, cores - torch.get_num_threads()))
    if device is not None and torch.device(device).type == "cuda":
        return max(1, min(32, cores - 1))
    return max(1, min(8, cores))


def as_model(model: Model | RecordedModel | str | None) -> Model | RecordedModel:
    """`model` as a Model: a Model or a `RecordedModel` (loaded when first used) as is, a name loaded once."""
    if isinstance(model, (Model, RecordedModel)):
        return model
    if isinstance(model, str):
        return _cached_model(model)
    if model is None:
        raise ValueError("no model given: pass model=clipkit.load_model(NAME) or a model name")
    raise ValueError(f"model must be a clipkit Model or a model name, got {type(model).__name__}")


_MODEL_CACHE: dict[str, Model] = {}


def _cached_model(name: str) -> Model:
    if name not in _MODEL_CACHE:
        _MODEL_CACHE[name] = load_model(name)
    return _MODEL_CACHE[name]


def kind_of(item: Any, str_is: str = TEXT) -> str | None:
    """TEXT or IMAGE for one input item, None when it is neither."""
    if isinstance(item, str):
        return str_is
    if isinstance(item, IMAGE_TYPES):
        return IMAGE
    if isinstance(item, np.ndarray) and item.ndim in (2, 3):
        return IMAGE
    return None


def warn_if_image_paths(texts: Sequence[str], stacklevel: int = 3) -> None:
    """Warn when a str about to be embedded as text names an image file: str means text, so
    `search("photos/cat.jpg", ...)` searches for the words "photos/cat.jpg", not for the picture."""
    named = next((text for text in texts if is_image_name(text) and os.path.isfile(text)), None)
    if named is not None:
        warnings.warn(f"{named!r} is taken as text, though it names an image file: pass pathlib.Path({named!r}) "
                      "(or images=[...]) to use the image", UserWarning, stacklevel=stacklevel)


def _as_list(items: Any, what: str) -> list:
    if isinstance(items, (str, np.ndarray, *IMAGE_TYPES)):
        raise ValueError(f"{what} must be a list; wrap a single item as [item]")
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"{what} must be a list, got {type(items).__name__}") from None
    if not items:
        raise ValueError(f"{what} is empty: nothing to encode")
    return items


def classify(items: Sequence, str_is: str = TEXT) -> str:
    """The one kind shared by every item; a mixed or unsupported list is a ValueError."""
    kinds = [kind_of(item, str_is) for item in items]
    for position, kind in enumerate(kinds):
        if kind is None:
            raise ValueError(f"item {position} has unsupported type {type(items[position]).__name__}: "
                             "expected str (text), or PIL image / pathlib.Path / HxWx3 uint8 array / an image "
                             "file's bytes (image)")
    if len(set(kinds)) > 1:
        first_other = next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise ValueError(f"mixed input: item 0 is {kinds[0]} but item {first_other} is {kinds[first_other]}; "
                         "encode texts and images in separate calls (or use texts=/images=)")
    return kinds[0]


def array_to_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if min(array.shape[:2]) < 1:
            raise ValueError(f"image array has an empty side: shape {array.shape}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(array)))
    raise ValueError(f"image arrays must be HxWx3 (or HxW, HxWx4), got shape {array.shape}")


def load_image(item: Any, min_side: int | None = None) -> Image.Image:
    """Any supported image input (PIL, path, array, an image file's bytes) as an RGB PIL image (`min_side`: see
    read_image)."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return array_to_image(item)
    if isinstance(item, (bytes, bytearray)):
        return decode_image(bytes(item), min_side=min_side)
    if isinstance(item, (TarMember, ImageURL)):  # an image inside a shard, or at a URL
        return decode_image(item.read_bytes(), str(item), min_side)
    return read_image(Path(item), min_side)


class _Inline:
    """A call made when its result is asked for, shaped like a Future (decoding without threads)."""

    def __init__(self, fn: Callable, item: Any):
        self.fn, self.item = fn, item

    def result(self):
        return self.fn(self.item)


def _prefetch(items: Sequence, fn: Callable, executor: Executor, depth: int) -> Iterator:
    """fn(item) for each item, in order, with up to `depth` calls running ahead in `executor`."""
    pending: collections.deque = collections.deque()
    iterator = iter(items)
    for item in iterator:
        pending.append(executor.submit(fn, item))
        if len(pending) >= depth:
            break
    while pending:
        future = pending.popleft()
        for item in iterator:
            pending.append(executor.submit(fn, item))
            break
        yield future


def iter_image_batches(items: Sequence, preprocess: Callable, batch_size: int, *, skip_errors: bool = False,
                       workers: int | None = None, device: torch.device | str | None = None,
                       draft_size: int | None = None
                       ) -> Iterator[tuple[torch.Tensor, list[int], list[tuple[int, str, str]]]]:
    """Decode and preprocess `items` in background threads, yielding full batches.

    Yields `(pixels, positions, failures)`: positions are the indices into `items` of the rows of
    `pixels`; failures are `(index, reason, kind)` of items that could not be read (only when
    skip_errors, otherwise the error is raised); `kind` is a few words such as "truncated or corrupt".
    `draft_size`: JPEG files are decoded at a reduced scale that keeps both sides >= it (the model's
    input size); None decodes them in full.
    """
    def prepare(item):
        return preprocess(load_image(item, draft_size))

    workers = default_workers(device) if workers is None else workers
    rows: list[torch.Tensor] = []
    positions: list[int] = []
    failures: list[tuple[int, str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as executor:
        results = (_prefetch(items, prepare, executor, depth=max(2 * batch_size, workers)) if workers
                   else (_Inline(prepare, item) for item in items))
        for position, future in enumerate(results):
            try:
                rows.append(future.result())
                positions.append(position)
            except (ValueError, OSError) as exc:  # unreadable, vanished or not an image
                if not skip_errors:
                    raise
                failures.append((position, str(exc), failure_kind(exc)))
            if len(rows) == batch_size:
                yield _batch(rows, device), positions, failures
                rows, positions, failures = [], [], []
    if rows or failures:
        yield (_batch(rows, device) if rows else torch.empty(0)), positions, failures


def _batch(rows: list[torch.Tensor], device) -> torch.Tensor:
    """Stacked; in pinned memory when it is going to a GPU, so the copy overlaps with compute."""
    pixels = torch.stack(rows)
    if device is not None and torch.device(device).type == "cuda":
        pixels = pixels.pin_memory()
    return pixels


def encode(inputs: Iterable | None = None, *, texts: Iterable[str] | None = None,
           images: Iterable | None = None, model: Model | str | None = None, batch_size: int = 64,
           progress: bool | None = False, workers: int | None = None, draft: bool = True) -> np.ndarray:
    """Embed texts or images into an `(N, D)` float32 array with unit-norm rows.

    `inputs`: a list of str (texts), or of PIL images / `pathlib.Path` / HxWx3 uint8 arrays (images).
    `texts=` and `images=` make the kind explicit (str paths are allowed under `images=`).
    A mixed list is a ValueError. `draft`: JPEG files much larger than the model's input are decoded
    at a reduced scale (PIL draft mode, several times faster for photos; embeddings differ very
    slightly from a full decode); draft=False decodes in full, exactly as open_clip's preprocessing.
    """
    given = [name for name, value in (("inputs", inputs), ("texts", texts), ("images", images)) if value is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of inputs, texts= or images= "
                         f"(got {', '.join(given) if given else 'none'})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if texts is not None:
        items = _as_list(texts, "texts")
        if not all(isinstance(t, str) for t in items):
            bad = next(i for i, t in enumerate(items) if not isinstance(t, str))
            raise ValueError(f"texts[{bad}] is {type(items[bad]).__name__}, not str")
        kind = TEXT
    elif images is not None:
        items = _as_list(images, "images")
        kind = classify(items, str_is=IMAGE)
        if kind != IMAGE:
            raise ValueError("images= holds something that is not an image")
    else:
        items = _as_list(inputs, "inputs")
        kind = classify(items)
        if kind == TEXT:
            warn_if_image_paths(items)
    model = as_model(model)
    if kind == TEXT:
        return encode_texts(items, model, batch_size, progress)
    return encode_images(items, model, batch_size, progress, workers, draft)


def encode_texts(texts: Sequence[str], model: Model, batch_size: int = 64, progress: bool | None = False) -> np.ndarray:
    """Text embeddings; captions are batched by token length, so each batch runs only as far as its
    longest caption (exact for CLIP's causal text tower, see `Model.encode_text`)."""
    out = np.empty((len(texts), model.dim), dtype=np.float32)
    if not len(texts):
        return out
    tokens = model.tokenize(texts)
    order = torch.argsort(_token_lengths(tokens), stable=True)
    with progress_bar(progress, total=len(texts), unit="text", desc="encoding texts") as bar:
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows.numpy()] = model.encode_text(tokens[rows]).cpu().numpy()
            bar.update(len(rows))
    return out


def _token_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Positions up to each row's last non-padding token (padding is id 0 in open_clip's tokenizers)."""
    positions = torch.arange(1, tokens.shape[1] + 1).expand_as(tokens)
    return (positions * (tokens != 0)).max(dim=1).values


def encode_images(images: Sequence, model: Model, batch_size: int = 64, progress: bool | None = False,
                  workers: int | None = None, draft: bool = True) -> np.ndarray:
    out = np.empty((len(images), *model.image_shape), dtype=np.float32)
    with progress_bar(progress, total=len(images), unit="img", desc="encoding images") as bar:
        for pixels, positions, _ in iter_image_batches(images, model.preprocess, batch_size, workers=workers,
                                                       device=model.device,
                                                       draft_size=model.image_size if draft else None):
            out[positions] = model.encode_image(pixels).cpu().numpy()
            bar.update(len(positions))
    return out


URL_WORKERS = 32  # threads that fetch and decode images by URL while the model embeds


def embed_image_files(paths: Sequence, model: Model, *, batch_size: int = 64, workers: int | None = None
                      ) -> Iterator[tuple[np.ndarray, list[int], list[tuple[int, str, str]]]]:
    """Embed image files (or shard members) batch by batch on this machine, skipping the unreadable: yields
    (float32 vectors of the read ones, their positions in `paths`, failures as (position, reason, kind)). What
    `clipkit index` commits batch by batch; `clipkit.encode_ray.RayEngine` yields the same from a Ray cluster."""
    if len(paths) and isinstance(paths[0], ImageURL):  # fetching waits on the network, not on cores
        workers = max(workers or 0, URL_WORKERS)
    for pixels, positions, failures in iter_image_batches(paths, model.preprocess, batch_size, skip_errors=True,
                                                           workers=workers, device=model.device,
                                                           draft_size=model.image_size):
        vectors = model.encode_image(pixels).float().cpu().numpy() if positions else np.zeros(
            (0, *model.image_shape), np.float32)
        yield vectors, positions, failures


def encode_gallery(model: Model, images: list, batch_size: int = 128,
                   states: bool | str = False) -> tuple[np.ndarray, torch.Tensor | None]:
    """A gallery for evaluation or re-ranking: (unit-norm image embeddings `(N, dim)` float32, and with `states` the ITM head's image input
    `(N, tokens, width)`, or with `states="pixels"` the preprocessed pixels `(N, 3, H, W)` on the CPU), from
    one decode and preprocess pass over `images`."""
    image_emb = np.empty((len(images), *model.image_shape), np.float32)
    kept = []
    for pixels, positions, _ in iter_image_batches(images, model.preprocess, batch_size, device=model.device):
        pixels = pixels.to(model.device)
        image_emb[positions] = model.encode_image(pixels).cpu().numpy()
        if states == "pixels":
            kept.append(pixels.cpu())
        elif states:
            kept.append(image_states(model, pixels))
    return image_emb, (torch.cat(kept) if states else None)
