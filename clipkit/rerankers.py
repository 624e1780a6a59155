"""Re-rankers: models that score (image, text) pairs, behind one interface, for re-ranking search results and
for `score_pairs`.

- `HeadReranker`: a clipkit model's own ITM head over its towers' token states; its score is the match
  log-odds, and re-ranked results add `weight` x the ITC cosine (the weight the head was fitted with).
- `BlipReranker`: a transformers `BlipForImageTextRetrieval` (BLIP's ITM head, as BLIP re-ranks its ITC
  candidates); its score is BLIP's match probability, softmax(itm_score)[:, 1]; weight 0 by default.

Each re-ranker prepares images and texts once (`image_inputs`, `text_inputs`) and then scores any pairs of
them (`match`), so an image scored against many captions (or a caption against many images) is encoded
once. Images are decoded and preprocessed together, in threads (`prepared`): a full-size photo is held only
while its own preprocessing runs, never a batch of them.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from clipkit._cache import Kept, file_version
from clipkit.data.images import TarMember
from clipkit.encode import as_model, encode, load_image
from clipkit.errors import ImageReadError, first_line
from clipkit.itm import encode_image_tokens, image_states, match_scores, require_itm, rerank_weight, text_states
from clipkit.itm.heads import DIRECTIONS


MAX_WEIGHT = 1e6  # the largest cosine weight taken: past it, scores lose the ITM term (and overflow near 1e308)


class Reranker:
    """Scores (image, text) pairs; `weights` are the ITC cosine weights re-ranked scores add by default, per
    direction ("t2i": a text query re-ranks images; "i2t": an image query re-ranks captions)."""

    name: str = "reranker"
    weights: dict[str, float] = {"t2i": 0.0, "i2t": 0.0}
    batch_size: int = 64

    @property
    def weight(self) -> float:
        """The text -> image cosine weight (the one `score_pairs` adds by default)."""
        return self.weights["t2i"]

    def cosine_weight(self, weight: float | None = None, direction: str = "t2i") -> float:
        """The cosine weight of a re-ranked score: the caller's `weight`, else this re-ranker's own for the
        `direction` ("t2i" or "i2t")."""
        if weight is None:
            return self.weights[direction]
        if not math.isfinite(float(weight)) or abs(float(weight)) > MAX_WEIGHT:
            raise ValueError(f"weight must be a finite number within +-{MAX_WEIGHT:g}, got {weight!r}")
        return float(weight)

    def pixels(self, image) -> torch.Tensor:
        """One RGB PIL image preprocessed for this re-ranker's image tower: a (3, H, W) tensor."""
        raise NotImplementedError

    def prepared(self, images: Sequence, skip_errors: bool = False, kept: bool = False) -> list:
        """`pixels` of each image (PIL images, paths, arrays, shard members), decoded in full and preprocessed
        in threads; with `skip_errors`, None for those that cannot be read (any more). `kept`: the pixels of
        image files are kept (`PIXEL_CACHE_BYTES` in all) for the next call that meets the same file, unchanged
        (its size and modification time), through a re-ranker of the same preprocessing: a search's candidates
        recur from query to query, and decoding a photo costs more than scoring it."""
        if not kept:
            return load_images(images, skip_errors=skip_errors, prepare=self.pixels)
        token = _preprocessing_token(self)
        keys = [(token, key) if key else None for key in map(_file_key, images)]
        out = [_PIXELS.get(key) if key else None for key in keys]
        missing = [n for n, pixels in enumerate(out) if pixels is None]
        for n, pixels in zip(missing, load_images([images[n] for n in missing], skip_errors=skip_errors,
                                                  prepare=self.pixels)):
            out[n] = pixels
            if pixels is not None and keys[n]:
                _PIXELS.put(keys[n], pixels)
        return out

    def preprocessing(self) -> Any:
        """The object whose identity stands for how `pixels` prepares an image (kept pixels are its own)."""
        return self

    def pixel_batches(self, images: Sequence | torch.Tensor) -> Iterator[torch.Tensor]:
        """`images` a batch of `batch_size` at a time, as preprocessed pixels: `images` may be a pixel batch
        already (`torch.stack(prepared(...))`), else each batch is decoded and preprocessed as it comes."""
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            yield chunk if isinstance(chunk, torch.Tensor) else torch.stack(self.prepared(chunk))

    def image_inputs(self, images: Sequence | torch.Tensor) -> Any:
        """What `match` reads of each image: images as PIL images, paths, arrays, or a pixel batch."""
        raise NotImplementedError

    def embedded_images(self, images: Sequence | torch.Tensor) -> tuple[Any, np.ndarray | None]:
        """(`image_inputs(images)`, the images' unit embeddings by the re-ranker's own dual encoder, else
        None)."""
        return self.image_inputs(images), None

    def embedded_texts(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        """(`text_inputs(texts)`, their unit embeddings from the same pass, else None), as `embedded_images`."""
        return self.text_inputs(texts), None

    def text_inputs(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def match(self, images: Any, image_index: np.ndarray, texts: Any, text_index: np.ndarray) -> np.ndarray:
        """The score of each pair (images[image_index[i]], texts[text_index[i]]), float32."""
        raise NotImplementedError

    def score_pairs(self, images: Sequence, texts: Sequence[str]) -> np.ndarray:
        """The score of each (images[i], texts[i]) pair; images as PIL images, paths or arrays."""
        if len(images) != len(texts):
            raise ValueError(f"score_pairs takes pairs: got {len(images)} images and {len(texts)} texts")
        index = np.arange(len(texts))
        if not len(index):
            return np.zeros(0, np.float32)
        return self.match(self.image_inputs(list(images)), index, self.text_inputs(list(texts)), index)


class HeadReranker(Reranker):
    """A clipkit model's own ITM head."""

    def __init__(self, model):
        self.model = as_model(model)
        self.head = require_itm(self.model)
        self.name = self.model.name
        self.weights = {direction: rerank_weight(self.head, None, direction) for direction in DIRECTIONS}

    def pixels(self, image) -> torch.Tensor:
        return self.model.preprocess(image)

    def preprocessing(self) -> Any:  # (a search makes a HeadReranker each call; its model's transform stays)
        return self.model.preprocess

    def image_inputs(self, images: Sequence | torch.Tensor) -> torch.Tensor:
        return self._image_pass(images, embed=False)[0]

    def embedded_images(self, images: Sequence | torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """The head's image input and the images' embeddings by the model: where the head reads the image
        tower's tokens (no stem of its own), from the same pass (one pass where a re-ranked score took two)."""
        return self._image_pass(images, embed=True)

    @torch.inference_mode()
    def _image_pass(self, images: Sequence | torch.Tensor, embed: bool) -> tuple[torch.Tensor, np.ndarray | None]:
        own_tower = not hasattr(self.head, "image_input") and self.model.vectors_per_image == 1
        states, embeddings = [], []
        for pixels in self.pixel_batches(images):
            if embed and own_tower:
                pooled, tokens = encode_image_tokens(self.model.clip, pixels.to(self.model.device))
                states.append(tokens)
                embeddings.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
                continue
            states.append(image_states(self.model, pixels))
            if embed:
                embeddings.append(self.model.encode_image(pixels).cpu())
        return torch.cat(states), torch.cat(embeddings).numpy() if embed else None

    def text_inputs(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return text_states(self.model, list(texts))

    def embedded_texts(self, texts: Sequence[str]) -> tuple[tuple[torch.Tensor, torch.Tensor], np.ndarray | None]:
        if self.model.vectors_per_image != 1:
            return self.text_inputs(texts), None
        states, padding, embeddings = text_states(self.model, list(texts), pooled=True)
        return (states, padding), embeddings.numpy()

    def match(self, images, image_index, texts, text_index) -> np.ndarray:
        states, padding = texts
        rows = torch.as_tensor(np.asarray(text_index), dtype=torch.long)
        return match_scores(self.head, states[rows], padding[rows], images,
                            torch.as_tensor(np.asarray(image_index), dtype=torch.long)).float().cpu().numpy()


REDUCED_SIDE = 1024  # a JPEG past Pillow's pixel limit is decoded at reduced scale, both sides >= this


PIXEL_CACHE_BYTES = 256 << 20  # prepared pixels of image files kept for the next re-ranking (`Reranker.prepared`)
_PIXELS = Kept(lambda: PIXEL_CACHE_BYTES, size=lambda pixels: pixels.nbytes)
_TOKENS: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_NEXT_TOKEN = itertools.count()
_TOKENS_LOCK = threading.Lock()


def _preprocessing_token(reranker: Reranker) -> int:
    """A number for the re-ranker's preprocessing, never given to another (an id() could be, once it is gone)."""
    with _TOKENS_LOCK:
        owner = reranker.preprocessing()
        if owner not in _TOKENS:
            _TOKENS[owner] = next(_NEXT_TOKEN)
        return _TOKENS[owner]


def _file_key(item) -> tuple | None:
    """What tells an image file's present content from its others: (path, size, modification time); for a shard
    member, its shard's; None for a picture in memory, or a file that cannot be read (decoding will say)."""
    path = item.tar if isinstance(item, TarMember) else item if isinstance(item, (str, os.PathLike)) else None
    version = file_version(path) if path is not None else None
    return version and (os.path.abspath(path), str(item), *version)


DECODE_WORKERS = min(16, os.cpu_count() or 1)  # threads that decode (and preprocess) images, all calls together
_POOL: list = []  # the one decoding pool of this process, made at its first use
_POOL_LOCK = threading.Lock()


def _decoding_pool() -> ThreadPoolExecutor:
    """The process's decoding threads, shared by every call: however many searches re-rank at once, at most
    DECODE_WORKERS full-size pictures are decoded at a time."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(DECODE_WORKERS, thread_name_prefix="decode"))
        return _POOL[0]


def _after_fork() -> None:
    """A forked child has none of its parent's threads: no decoding pool, and no lock another thread held."""
    global _PIXELS, _POOL_LOCK, _TOKENS_LOCK
    _POOL.clear()
    _PIXELS = Kept(_PIXELS.limit, _PIXELS.size)
    _POOL_LOCK, _TOKENS_LOCK = threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def load_images(images: Sequence, skip_errors: bool = False, prepare=None) -> list:
    """PIL images of `images` (PIL images, paths, arrays, shard members), decoded in full in the decoding
    threads (a JPEG past Pillow's pixel limit, a 100 MP photo, at reduced scale: more pixels than any
    re-ranker reads), or with `prepare`, prepare(image) of each, in the same thread as its decoding (only the
    prepared kept); with `skip_errors`, None for those that cannot be read (any more)."""
    def read(item):
        try:
            try:
                picture = load_image(item)
            except ImageReadError as exc:
                if exc.kind != "too many pixels":
                    raise
                picture = load_image(item, min_side=REDUCED_SIDE)
        except (ValueError, OSError):
            if not skip_errors:
                raise
            return None
        return picture if prepare is None else prepare(picture)

    items = list(images)
    if len(items) < 2:
        return [read(item) for item in items]
    return list(_decoding_pool().map(read, items))


def load_reranker(source, *, device: str | torch.device | None = None) -> Reranker:
    """A re-ranker: a `Reranker` as is; a clipkit model (or model name) with an ITM head; or a transformers
    BLIP ITM checkpoint (a `save_pretrained` directory, or `hf:ORG/REPO` through the cache)."""
    from clipkit.hf import is_hf_name
    from clipkit.models import Model, load_model
    from clipkit.recorded import RecordedModel

    if isinstance(source, Reranker):
        return source
    if isinstance(source, (Model, RecordedModel)):
        return _own_reranker(source, device)
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise ValueError(f"a re-ranker is a model name, a directory or hf:ORG/REPO; got {source!r}")
    family = _blip_family(str(source)) if is_hf_name(str(source)) else None
    if family is not None:
        return family.load(str(source), device=device)
    return HeadReranker(load_model(str(source), device=device))


def _own_reranker(model, device) -> Reranker:
    """A model's own re-ranker: a BLIP-2 checkpoint's ITM head (loaded once, kept on the model: the same
    checkpoint retrieves and re-ranks), else the clipkit ITM head it carries."""
    from clipkit.hf import is_hf_name

    if model.vectors_per_image > 1 and is_hf_name(model.name):
        if getattr(model, "_blip2_reranker", None) is None:
            model._blip2_reranker = Blip2Reranker.load(model.name, device=device or model.device)
        return model._blip2_reranker
    return HeadReranker(model)


def _blip_family(source: str) -> "type[BlipReranker] | None":
    """The re-ranker class of a transformers BLIP or BLIP-2 ITM checkpoint, else None."""
    from clipkit.hf import hf_source, quiet_transformers, require_transformers

    transformers = require_transformers()
    path, _, local_only = hf_source(source)
    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=local_only)
    architectures = getattr(config, "architectures", None) or []
    if "Blip2ForImageTextRetrieval" in architectures or config.model_type == "blip-2":
        return Blip2Reranker
    if "BlipForImageTextRetrieval" in architectures or config.model_type == "blip":
        return BlipReranker
    return None


def score_pairs(images: Sequence, texts: Sequence[str], *, model=None, reranker=None,
                weight: float | None = None) -> np.ndarray:
    """The re-ranking score of each (images[i], texts[i]) pair, the score `search(..., rerank=True)` orders
    by: the re-ranker's score (a clipkit ITM head's match log-odds, or BLIP's match probability) plus
    `weight` x the pair's ITC cosine by `model` (default weight: the re-ranker's own; 0 for BLIP).
    `reranker` defaults to `model`'s ITM head."""
    reranker = load_reranker(reranker if reranker is not None else as_model(model))
    weight = reranker.cosine_weight(weight)
    if weight and model is None and not isinstance(reranker, HeadReranker):
        raise ValueError("a cosine weight needs the dual encoder that gives the cosine: pass model=")
    images, texts = list(images), list(texts)
    if len(images) != len(texts):
        raise ValueError(f"score_pairs takes pairs: got {len(images)} images and {len(texts)} texts")
    if not texts:
        return np.zeros(0, np.float32)
    pairs = np.arange(len(texts))
    own = reranker.model if isinstance(reranker, HeadReranker) else None  # (BLIP's is no dual encoder)
    encoder = own if model is None else as_model(model)
    if not weight or encoder is own:
        return pair_scores(reranker, images, pairs, texts, pairs, weight)
    pictures = load_images(images)  # another model's cosine: each picture decoded once, for both
    cosine = np.sum(encode(pictures, model=encoder) * encode(texts, model=encoder), axis=1)
    return (pair_scores(reranker, pictures, pairs, texts, pairs, 0.0) + weight * cosine).astype(np.float32)


def pair_scores(reranker: Reranker, images: Sequence | torch.Tensor, image_index: np.ndarray, texts: list[str],
                text_index: np.ndarray, weight: float) -> np.ndarray:
    """The re-ranking score of each pair (images[image_index[i]], texts[text_index[i]]) (images: PIL images,
    paths, arrays, or a pixel batch of `reranker.prepared`): the re-ranker's score plus `weight` x the pair's
    ITC cosine by the re-ranker's own model (a clipkit head's: its weight was fitted to it; the embeddings come
    from the passes that give the head its inputs), float32. `score_pairs` and a search's re-ranking both score
    through it, so that they agree."""
    if not weight:
        return reranker.match(reranker.image_inputs(images), image_index, reranker.text_inputs(texts),
                              text_index).astype(np.float32)
    (image_input, image_emb), (text_input, text_emb) = reranker.embedded_images(images), \
        reranker.embedded_texts(texts)
    if image_emb is None:
        raise ValueError(f"a cosine weight needs a dual encoder, which {reranker.name} is not: pass model=")
    text_emb = encode(texts, model=reranker.model) if text_emb is None else text_emb
    scores = reranker.match(image_input, image_index, text_input, text_index)
    return (scores + weight * np.sum(image_emb[image_index] * text_emb[text_index], axis=1)).astype(np.float32)


class BlipReranker(Reranker):
    """BLIP's ITM head (transformers `BlipForImageTextRetrieval`): the match probability of each pair.

    Each image passes the vision tower once (`image_inputs`); each pair then passes the text encoder with
    cross-attention to its image's tokens and the ITM head, as `BlipForImageTextRetrieval(use_itm_head=True)`
    computes it."""

    def __init__(self, model, processor, name: str, device: torch.device):
        self.model, self.processor, self.name, self.device = model, processor, name, device
        self.batch_size = 32
        self.max_length = self._max_length()

    classes = ("BlipForImageTextRetrieval", "BlipProcessor")  # transformers' model and processor

    @classmethod
    def load(cls, source: str, device: str | torch.device | None = None) -> "BlipReranker":
        from clipkit.hf import hf_source, quiet_transformers, require_transformers
        from clipkit.models import resolve_device

        transformers = require_transformers()
        path, name, local_only = hf_source(source)
        device = resolve_device(device)
        model_class, processor_class = (getattr(transformers, c) for c in cls.classes)
        try:
            with quiet_transformers():
                model = model_class.from_pretrained(path, local_files_only=local_only)
                processor = processor_class.from_pretrained(path, local_files_only=local_only)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the {cls.classes[0]} checkpoint {source}: {first_line(exc)}") from None
        return cls(model.to(device).eval(), processor, name, device)

    def _max_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    def pixels(self, image) -> torch.Tensor:
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    @torch.inference_mode()
    def image_inputs(self, images: Sequence | torch.Tensor) -> torch.Tensor:
        """The vision tower's token states of each image."""
        return torch.cat([self.model.vision_model(pixel_values=pixels.to(self.device)).last_hidden_state
                          for pixels in self.pixel_batches(images)])

    def text_inputs(self, texts: Sequence[str]) -> list[str]:
        return list(texts)

    @torch.inference_mode()
    def match(self, images, image_index, texts, text_index) -> np.ndarray:
        scores = []
        for start in range(0, len(text_index), self.batch_size):
            rows = np.asarray(text_index[start:start + self.batch_size])
            tokens = self.processor.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                              max_length=self.max_length, return_tensors="pt").to(self.device)
            states = images[torch.as_tensor(np.asarray(image_index[start:start + self.batch_size]), dtype=torch.long,
                                            device=images.device)]
            scores.append(self._match_probability(tokens, states).cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def _match_probability(self, tokens, states: torch.Tensor) -> torch.Tensor:
        """The ITM head's match probability of each (text tokens, image token states) pair."""
        encoded = self.model.text_encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                          encoder_hidden_states=states,
                                          encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                            device=states.device))
        logits = self.model.itm_head(encoded.last_hidden_state[:, 0, :])
        return torch.softmax(logits.float(), dim=-1)[:, 1]

class Blip2Reranker(BlipReranker):
    """BLIP-2's ITM head (transformers `Blip2ForImageTextRetrieval`): the match probability of each pair.

    Each image passes the frozen vision tower once (`image_inputs`, inherited); each pair then passes the
    Q-Former, its learned queries and the text tokens together, cross-attending to the image's tokens, and
    the ITM head's logits averaged over the query positions, as `Blip2ForImageTextRetrieval(
    use_image_text_matching_head=True)` computes them."""

    classes = ("Blip2ForImageTextRetrieval", "Blip2Processor")

    def _max_length(self) -> int:  # (the Q-Former's positions number the text's tokens; its queries have none)
        return int(self.model.config.qformer_config.max_position_embeddings)

    def _match_probability(self, tokens, states: torch.Tensor) -> torch.Tensor:
        model = self.model
        queries = model.query_tokens.expand(len(states), -1, -1)
        mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long, device=states.device),
                          tokens["attention_mask"]], dim=1)
        encoded = model.qformer(query_embeds=model.embeddings(input_ids=tokens["input_ids"], query_embeds=queries),
                                query_length=queries.shape[1], attention_mask=mask, encoder_hidden_states=states,
                                encoder_attention_mask=torch.ones(states.shape[:-1], dtype=torch.long,
                                                                  device=states.device))
        logits = model.itm_head(encoded.last_hidden_state[:, :queries.shape[1], :].to(model.itm_head.weight.dtype))
        return torch.softmax(logits.mean(dim=1).float(), dim=-1)[:, 1]
