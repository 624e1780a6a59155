"""The server's service: the served collections (an index, its model's thread and query batcher), the
request bodies, and the query / search / file logic the routes call. Searches go through the library's
one search path (`clipkit.search.ranked_hits_many`'s steps)."""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from clipkit import __version__
from clipkit._cache import Kept
from clipkit.data.images import decode_image, encode_image, image_media_type, is_url
from clipkit.index import Index, prepare_vectors
from clipkit.index.captions import first_captions
from clipkit.index.files import read_indexed
from clipkit.index.shards import item_image
from clipkit.index.sync import bytes_hash
from clipkit.search import Hit, rerank_pairs, rerank_plan, rerank_scored, searched_collection
from clipkit.serve.batcher import IMAGE, TEXT, Batcher, ModelWorker, SearchBatcher
from clipkit.data.fetch import Fetcher

log = logging.getLogger("clipkit.serve")
STATIC_DIR = Path(__file__).parent / "static"
#: What browsers display as they are; other images (HEIC, TIFF) are served as a JPEG of them.
BROWSER_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp", "image/avif", "image/bmp"})
VECTOR, ITEM = "vector", "item"


@dataclass
class ServeConfig:
    max_k: int = 1000  # results per query (k and num_images are capped to it) and ids per /metadata request
    max_result_ids: int = 10_000  # clip-retrieval's num_result_ids (results without metadata) are capped to it
    inline_images: int = 0  # clip-retrieval replies carry each image as a base64 JPEG this many pixels wide (0: no)
    front_dir: str | None = None  # clip-retrieval's front end build, served at /front/
    max_rerank_k: int = 200  # candidates the ITM head scores per query
    max_body_bytes: int = 20 * 2**20  # whole request body, JSON or multipart
    max_image_bytes: int = 128 * 2**20  # an indexed image file that /image and /thumbnail read (100 MP: 20-80 MB)
    allow_image_urls: bool = False  # fetch `image_url` queries (public http(s) hosts only)
    fetch_deadline: float = 10.0  # seconds for one image_url fetch in all (redirects, slow servers included)
    max_fetches: int = 8  # image_url fetches running at once; more are answered 503
    cors_origins: list[str] = field(default_factory=list)
    max_batch: int = 64  # queries per encoder call
    max_search_batch: int = 256  # queued searches of one index made in one index search (1: each alone)
    thumbnail_cache: int = 1024  # thumbnails kept in memory
    token: str | None = None  # every request must show it (`clipkit.serve.token`); None: none asked


@dataclass
class Collection:
    """One served index and the model (worker thread and batcher) that embeds its queries."""

    name: str
    index: Index
    model: Any
    worker: ModelWorker
    batcher: Batcher


class BadRequest(HTTPException):
    def __init__(self, detail: str, status_code: int = 400):
        super().__init__(status_code=status_code, detail=detail)


# ---------------------------------------------------------------------------------------------
# clipkit's request body (unknown fields are ignored)


def _not_a_boolean(value):
    """JSON's true / false where a number belongs is refused (pydantic's lax mode reads true as 1: {"id": true}
    searched item 1)."""
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64-encoded image file")
    embedding: list[Float] | None = None
    id: Int | None = Field(None, description="an item's key: search by that item's embedding (more like this)")
    item: str | None = Field(None, max_length=65536, description="an item's id as results give it (item_id: its "
                             "file's path, SHARD.tar#KEY, its URL): search by its stored embedding")
    k: Int = Field(20, ge=1)
    rerank: bool = False
    rerank_k: Int | None = Field(None, ge=1)
    weight: Float | None = Field(None, allow_inf_nan=False, description="re-ranked score = ITM log-odds + weight x cosine (default: "
                                                 "the weight the model's ITM head was fitted with)")
    modality: Literal["image", "text"] = Field("image", description="search the images, or the captions indexed "
                                                                   "beside them (image -> text, text -> text)")
    index: str | None = None
    under: str | None = Field(None, max_length=4096, description="only the items whose file lies in this folder "
                              "(an absolute path, as the results' paths are) or below it")


class BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The service


class Service:
    def __init__(self, collections_: dict[str, Collection], config: ServeConfig, reranker=None):
        if not collections_:
            raise ValueError("nothing to serve: give at least one index")
        self.collections = collections_
        self.config = config
        self.reranker = reranker  # re-ranks instead of each model's ITM head, when given
        self._thumbnails = Kept(lambda: self.config.thumbnail_cache)
        self._unsupported_noted: set[str] = set()
        self.fetcher = Fetcher(config.max_body_bytes, config.fetch_deadline, config.max_fetches)
        self.searcher = SearchBatcher(config.max_search_batch)  # requests searching one index at once: together

    def note_unsupported(self, names: list[str], reasons: dict[str, str]) -> None:
        """Log, once per option, that a client asked for something this server does not implement."""
        for name in names:
            if name not in self._unsupported_noted:
                self._unsupported_noted.add(name)
                log.warning("a client asked for %s, which clipkit does not implement: %s", name, reasons[name])

    def collection(self, name: str | None) -> Collection:
        if name is None or name == "":
            return next(iter(self.collections.values()))
        if name not in self.collections:
            raise BadRequest(f"no index named {name!r}; indexes: {', '.join(self.collections)}", 404)
        return self.collections[name]

    # -- queries --------------------------------------------------------------------------------

    async def decode_upload(self, data: bytes, collection: Collection):
        """(RGB image, preprocessed pixels) of uploaded image bytes, decoded off the event loop."""
        if not data:
            raise BadRequest("the image is empty")

        def decode():
            image = decode_image(data, "(uploaded)", min_side=collection.model.image_size)
            return image, collection.model.preprocess(image)

        try:
            return await run_in_threadpool(decode)
        except (ValueError, OSError) as exc:
            raise BadRequest(str(exc)) from None

    @staticmethod
    def item_key(collection: Collection, item_id: str) -> int:
        """The key of the item whose id is `item_id` (a result's `item_id`), or a 404."""
        try:
            found = collection.index.find([item_id])
        except ValueError as exc:  # (an id no index could hold)
            raise BadRequest(str(exc)) from None
        if item_id not in found:
            raise BadRequest(f"no item {item_id!r} in index {collection.name!r}", 404)
        return int(found[item_id]["key"])

    async def query(self, collection: Collection, kind: str, value: Any) -> tuple[np.ndarray, Any]:
        """(unit query vector, the query as rerank_hits takes it) for a text, image, vector or item query."""
        index = collection.index
        if kind == TEXT:
            if not value.strip():
                raise BadRequest("the text query is empty")
            return await collection.batcher.encode(TEXT, value), value
        if kind == IMAGE:
            image, pixels = value
            return await collection.batcher.encode(IMAGE, pixels), image
        if kind == ITEM:
            record = index.get_by_key([value])[0]
            if record is None:
                raise BadRequest(f"no item with id {value} in index {collection.name!r}", 404)
            return index.embeddings([record["id"]])[0], record
        try:
            return prepare_vectors(value, index.dim, "the embedding")[0], None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    async def search(self, collection: Collection, kind: str, value: Any, k: int, *, rerank: bool = False,
                     rerank_k: int | None = None, weight: float | None = None, modality: str = "image",
                     max_k: int | None = None, under: str | None = None) -> list[dict]:
        """The library's search (`clipkit.search.ranked_hits_many`'s steps) with the server's limits (at most
        `max_k` results, default `config.max_k`): the nearest items found together with other requests' (the
        search batcher), re-ranked on the model's thread; what the library refuses is a 400 with its message."""
        vector, query = await self.query(collection, kind, value)
        kind = kind if kind in (TEXT, IMAGE) else VECTOR
        k = min(k, max_k or self.config.max_k)
        try:
            target = searched_collection(collection.index, modality, kind=kind, rerank=rerank)
            plan = functools.partial(rerank_plan, k, kind=kind, model=collection.model, rerank=rerank,
                                     rerank_k=rerank_k, max_depth=self.config.max_rerank_k, reranker=self.reranker)
            depth, reranker = await collection.worker.run(plan) if rerank else plan()  # (a re-ranker may load)
            hits = await self.searcher.nearest(target, vector, depth, under or None)
            if reranker is not None:  # the candidates decoded and preprocessed in the thread pool, scored on the model's thread
                pairs = await run_in_threadpool(rerank_pairs, query, kind, hits, reranker)
                hits = await collection.worker.run(rerank_scored, pairs, kind, reranker, weight)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        hits = hits[:k]
        if target is not collection.index:  # captions: files and thumbnails are their images'
            return await run_in_threadpool(self.caption_results, collection, hits)
        firsts = await run_in_threadpool(self.first_captions, collection, hits)
        return [self.result(collection, hit.key, hit, caption=firsts.get(hit.id)) for hit in hits]

    @staticmethod
    def first_captions(collection: Collection, hits: list[Hit]) -> dict:
        """Image hit id -> its first caption, where the index holds captions (as clip-retrieval's results carry
        one): what the page shows under the picture."""
        captions = collection.index.captions
        wanted = [hit.id for hit in hits if hit.metadata.get("caption") is None]
        return {image: record["caption"] for image, record in first_captions(captions, wanted).items()}

    def caption_results(self, collection: Collection, hits: list[Hit]) -> list[dict]:
        """Caption hits as results: `id` and the URLs are its image's (so "more like this" and the files work as
        for image hits), `caption_id` / `item_id` the caption's key and id; a caption whose image went
        meanwhile drops out."""
        images = collection.index.find([h.metadata["image_id"] for h in hits if h.metadata.get("image_id")])
        out = []
        for hit in hits:
            image = images.get(hit.metadata.get("image_id"))
            if image is not None:
                out.append({**self.result(collection, image["key"], hit, image), "caption_id": hit.key})
        return out

    @staticmethod
    def result(collection: Collection, key: int, hit: Hit, image: dict | None = None,
               caption: str | None = None) -> dict:
        """A hit as the API returns it; `image`: the record of the image it shows (a caption hit's), else
        the hit's own; `caption`: an image hit's first caption."""
        out = {"id": key, "item_id": hit.id, "score": hit.score}
        if "itc_score" in hit.metadata:
            out["itc_score"] = hit.metadata["itc_score"]
        caption = hit.metadata["caption"] if hit.metadata.get("caption") is not None else caption
        if caption is not None:
            out["caption"] = caption
        if hit.path is not None:
            out["path"] = hit.path
        path, record = (image.get("path"), image) if image is not None else (hit.path, hit.metadata)
        if item_image(path, record) is not None:
            out["image_url"] = f"image/{key}?index={quote(collection.name)}"
            out["thumbnail_url"] = f"thumbnail/{key}?index={quote(collection.name)}"
        elif is_url(record.get("url")):  # indexed from a URL table: the browser shows it from its host
            out["url"] = out["image_url"] = out["thumbnail_url"] = record["url"]
        return out

    # -- files ----------------------------------------------------------------------------------

    def image_bytes(self, collection: Collection, key: int) -> tuple[bytes, str]:
        """(bytes, media type) of item `key`'s image, only while it is still the file that was indexed (see
        `clipkit.index.files.read_indexed`) and decodes as an image: whatever else now sits at its path is a
        404, so that nobody who can write into an indexed folder reads other files through the server."""
        record = collection.index.get_by_key([key])[0]
        source = item_image(record.get("path"), record) if record is not None else None
        if source is None:
            raise BadRequest(f"no image with id {key} in index {collection.name!r}", 404)
        try:
            data = read_indexed(collection.index, record, source, self.config.max_image_bytes)
            media_type = image_media_type(data, str(source))
            if media_type not in BROWSER_IMAGE_TYPES:  # HEIC, TIFF: a JPEG of it, which every browser shows
                return encode_image(decode_image(data, str(source)), "jpg"), "image/jpeg"
            return data, media_type
        except (ValueError, OSError) as exc:
            raise BadRequest(f"the image of item {key} cannot be served: {exc}", 404) from None

    def thumbnail(self, collection: Collection, key: int, size: int) -> bytes:
        data, _ = self.image_bytes(collection, key)
        cache_key = (collection.name, key, size, bytes_hash(data))
        kept = self._thumbnails.get(cache_key)
        if kept is not None:
            return kept
        try:
            image = decode_image(data, f"item {key}", min_side=size)  # (a large JPEG: decoded at reduced scale)
        except (ValueError, OSError) as exc:
            raise BadRequest(f"the image of item {key} cannot be read: {exc}", 404) from None
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        thumbnail = buffer.getvalue()
        self._thumbnails.put(cache_key, thumbnail)
        return thumbnail

    def info(self) -> dict:
        return {
            "status": "ok", "version": __version__,
            "indexes": {name: {"items": len(c.index), "model": c.model.name, "dim": c.index.dim,
                               "rerank": c.model.itm is not None or self.reranker is not None,
                               "captions": len(c.index.captions) if c.index.captions is not None else 0,
                               "structure": c.index.structure,
                               "estimated_recall": (c.index.tuning or {}).get("estimated_recall")}
                        for name, c in self.collections.items()},
            "reranker": self.reranker.name if self.reranker is not None else None,
            "limits": {"max_k": self.config.max_k, "max_rerank_k": self.config.max_rerank_k,
                       "max_result_ids": self.config.max_result_ids, "max_body_bytes": self.config.max_body_bytes,
                       "max_image_bytes": self.config.max_image_bytes},
            "encoder_calls": sum(c.batcher.batches for c in self._batchers()),
            "encoded_queries": sum(c.batcher.items for c in self._batchers()),
            "index_searches": self.searcher.batches, "searched_queries": self.searcher.items,
        }

    def _batchers(self) -> list[Collection]:
        seen, out = set(), []
        for c in self.collections.values():
            if id(c.batcher) not in seen:
                seen.add(id(c.batcher))
                out.append(c)
        return out


def _b64decode(text: str) -> bytes:
    if "," in text[:100] and text.startswith("data:"):
        text = text.split(",", 1)[1]  # a data: URL, as browsers make them
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


async def _json_body(request: Request, model: type[BaseModel]) -> BaseModel:
    """Parse the body as JSON whatever its content type (clip-retrieval's page sends text/plain)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return validated(model, data)


def validated(model: type[BaseModel], data: dict) -> BaseModel:
    """`data` as `model`, or a 422 naming the first field at fault ("k: Input should be greater than …")."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = str(first.get("msg", "")).removeprefix("Value error, ")
        raise BadRequest(f"{where}: {message}", 422) from None


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def _deduplicate(index: Index, results: list[dict], threshold: float = 0.94) -> list[dict]:
    """Drop results whose embedding is within `threshold` cosine of a better-ranked kept one."""
    if len(results) < 2:
        return results
    vectors = index.embeddings([r["item_id"] for r in results])
    kept: list[int] = []
    for position in range(len(results)):
        if not kept or float(np.max(vectors[kept] @ vectors[position])) < threshold:
            kept.append(position)
    return [results[p] for p in kept]
