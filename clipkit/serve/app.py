"""The HTTP service: clip-retrieval's protocol, clipkit's own search API, image files and the web page.

    clipkit serve --index photos.clipkit [--index other=path] [--host 127.0.0.1] [--port 8000]

Items are addressed over HTTP by their index key, a stable integer (clip-retrieval's ids are
integers too); files are served only for items in an index, looked up by that key, never by a path
taken from the request. Bad input is a 4xx with a one-line `detail`, never a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import json
import mimetypes
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clipkit import __version__
from clipkit.data.images import decode_image, read_image
from clipkit.errors import ClipkitError
from clipkit.index import Index, prepare_vectors
from clipkit.itm import require_itm
from clipkit.search import Hit, index_model, nearest_hits, rerank_hits
from clipkit.serve.batcher import IMAGE, TEXT, Batcher, ModelWorker
from clipkit.serve.fetch import FetchError, fetch_image_bytes

STATIC_DIR = Path(__file__).parent / "static"
VECTOR, ITEM = "vector", "item"


@dataclass
class ServeConfig:
    max_k: int = 1000  # results per query (k, num_images and num_result_ids are capped to it)
    max_rerank_k: int = 200  # candidates the ITM head scores per query
    max_body_bytes: int = 20 * 2**20  # whole request body, JSON or multipart
    allow_image_urls: bool = False  # fetch `image_url` queries (public http(s) hosts only)
    cors_origins: list[str] = field(default_factory=list)
    max_batch: int = 64  # queries per encoder call
    thumbnail_cache: int = 1024  # thumbnails kept in memory


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
# Request bodies (unknown fields are ignored: clip-retrieval's clients send flags clipkit lacks)


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64-encoded image file")
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1)
    num_result_ids: int | None = Field(None, ge=1)
    indice_name: str | None = None
    deduplicate: bool = False


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int]
    indice_name: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64-encoded image file")
    embedding: list[float] | None = None
    id: int | None = Field(None, description="an item's key: search by that item's embedding (more like this)")
    k: int = Field(20, ge=1)
    rerank: bool = False
    rerank_k: int | None = Field(None, ge=1)
    weight: float | None = Field(None, description="re-ranked score = ITM log-odds + weight x cosine (default: "
                                                 "the weight the model's ITM head was fitted with)")
    index: str | None = None


# ---------------------------------------------------------------------------------------------
# Request-size limit


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before it is read in full."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"detail": f"request body over the {self.limit} byte limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# The service


class Service:
    def __init__(self, collections_: dict[str, Collection], config: ServeConfig):
        if not collections_:
            raise ValueError("nothing to serve: give at least one index")
        self.collections = collections_
        self.config = config
        self._thumbnails: collections.OrderedDict = collections.OrderedDict()
        self._thumbnail_lock = threading.Lock()

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
                     rerank_k: int | None = None, weight: float | None = None) -> list[dict]:
        k = min(k, self.config.max_k)
        vector, query = await self.query(collection, kind, value)
        if rerank:
            try:
                require_itm(collection.model)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            if kind != TEXT:
                raise BadRequest("re-ranking scores a text query against images; search by text to re-rank")
            depth = min(max(k, rerank_k or 32), self.config.max_rerank_k)
        else:
            depth = k
        hits = await run_in_threadpool(nearest_hits, collection.index, vector, depth)
        if rerank:
            try:
                hits = await collection.worker.run(rerank_hits, query, TEXT, hits, collection.model, weight)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        hits = hits[:k]
        return [self.result(collection, hit.key, hit) for hit in hits]

    @staticmethod
    def result(collection: Collection, key: int, hit: Hit) -> dict:
        out = {"id": key, "item_id": hit.id, "score": hit.score}
        if "itc_score" in hit.metadata:
            out["itc_score"] = hit.metadata["itc_score"]
        if hit.metadata.get("caption") is not None:
            out["caption"] = hit.metadata["caption"]
        if hit.path is not None:
            out["path"] = hit.path
            out["image_url"] = f"image/{key}?index={collection.name}"
            out["thumbnail_url"] = f"thumbnail/{key}?index={collection.name}"
        return out

    # -- files ----------------------------------------------------------------------------------

    def file_of(self, collection: Collection, key: int) -> Path:
        record = collection.index.get_by_key([key])[0]
        if record is None or not record.get("path"):
            raise BadRequest(f"no image with id {key} in index {collection.name!r}", 404)
        path = Path(record["path"])
        if not path.is_file():
            raise BadRequest(f"the file of item {key} is no longer there", 404)
        return path

    def thumbnail(self, collection: Collection, key: int, size: int) -> bytes:
        path = self.file_of(collection, key)
        stat = path.stat()
        cache_key = (collection.name, key, size, stat.st_mtime_ns, stat.st_size)
        with self._thumbnail_lock:
            if cache_key in self._thumbnails:
                self._thumbnails.move_to_end(cache_key)
                return self._thumbnails[cache_key]
        try:
            image = read_image(path)
        except (ValueError, OSError) as exc:
            raise BadRequest(f"the file of item {key} cannot be read: {exc}", 404) from None
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._thumbnail_lock:
            self._thumbnails[cache_key] = data
            while len(self._thumbnails) > self.config.thumbnail_cache:
                self._thumbnails.popitem(last=False)
        return data

    def info(self) -> dict:
        return {
            "status": "ok", "version": __version__,
            "indexes": {name: {"items": len(c.index), "model": c.model.name, "dim": c.index.dim,
                               "rerank": c.model.itm is not None}
                        for name, c in self.collections.items()},
            "limits": {"max_k": self.config.max_k, "max_rerank_k": self.config.max_rerank_k,
                       "max_body_bytes": self.config.max_body_bytes},
            "encoder_calls": sum(c.batcher.batches for c in self._batchers()),
            "encoded_queries": sum(c.batcher.items for c in self._batchers()),
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
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise BadRequest(f"{where}: {first.get('msg')}", 422) from None


def _schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


# ---------------------------------------------------------------------------------------------
# The app


def create_app(indexes: dict[str, Index] | Index, *, model=None, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `indexes` (name -> Index; one Index is served as 'default').

    Each index's queries are embedded by its own model (or `model`, checked against it); indexes
    built by the same model share one model thread and one batcher.
    """
    config = config or ServeConfig()
    if isinstance(indexes, Index):
        indexes = {"default": indexes}
    workers: dict[tuple, tuple[ModelWorker, Batcher]] = {}
    collections_: dict[str, Collection] = {}
    for name, index in indexes.items():
        resolved = index_model(index, model)
        shared = (resolved.fingerprint, str(resolved.device))
        if shared not in workers:
            worker = ModelWorker(resolved)
            workers[shared] = (worker, Batcher(worker, config.max_batch))
        worker, batcher = workers[shared]
        collections_[name] = Collection(name, index, worker.model, worker, batcher)
    service = Service(collections_, config)

    @asynccontextmanager
    async def lifespan(app):
        yield
        for worker, batcher in workers.values():
            await batcher.close()
            worker.close()

    app = FastAPI(title="clipkit", version=__version__, lifespan=lifespan,
                  description="Text and image search over clipkit indexes; clip-retrieval compatible.")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"])

    @app.exception_handler(ClipkitError)
    async def clipkit_error(request: Request, exc: ClipkitError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    # -- the page --------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", summary="Liveness, the served indexes and the limits")
    async def healthz():
        return service.info()

    # -- clip-retrieval's protocol ----------------------------------------------------------------

    @app.get("/indices-list", summary="clip-retrieval: the index names")
    async def indices_list():
        return list(service.collections)

    @app.post("/knn-service", summary="clip-retrieval: nearest neighbours of a text, image, URL or embedding",
              openapi_extra=_schema(KnnRequest))
    async def knn_service(request: Request):
        body = await _json_body(request, KnnRequest)
        collection = service.collection(body.indice_name)
        if body.modality == "text":
            raise BadRequest(f"index {collection.name!r} holds image embeddings only; use modality 'image'")
        kind, value = await _knn_query(body, collection)
        count = min(body.num_images, config.max_k)
        # candidates to search: num_result_ids as clip-retrieval, else enough to fill num_images after dedup
        wanted = body.num_result_ids or (4 * count if body.deduplicate else count)
        depth = min(max(wanted, count), config.max_k)
        results = await service.search(collection, kind, value, depth)
        if body.deduplicate:
            results = await run_in_threadpool(_deduplicate, collection.index, results)
        base = str(request.base_url)
        out = []
        for result in results[:count]:
            item = {"id": result["id"], "similarity": result["score"]}
            if "caption" in result:
                item["caption"] = result["caption"]
            if "path" in result:
                item["image_path"] = result["path"]
                item["url"] = base + result["image_url"]
            out.append(item)
        return out

    async def _knn_query(body: KnnRequest, collection: Collection) -> tuple[str, Any]:
        if body.text:  # clip-retrieval's page sends text "" beside an image
            return TEXT, body.text
        if body.image:
            return IMAGE, await service.decode_upload(_b64decode(body.image), collection)
        if body.image_url:
            if not config.allow_image_urls:
                raise BadRequest("this server does not fetch image_url (start it with --allow-image-urls)", 403)
            try:
                data = await run_in_threadpool(fetch_image_bytes, body.image_url, config.max_body_bytes)
            except FetchError as exc:
                raise BadRequest(str(exc)) from None
            return IMAGE, await service.decode_upload(data, collection)
        if body.embedding_input is not None:
            return VECTOR, body.embedding_input
        raise BadRequest("give one of text, image, image_url or embedding_input")

    @app.post("/metadata", summary="clip-retrieval: metadata of items by id", openapi_extra=_schema(MetadataRequest))
    async def metadata(request: Request):
        body = await _json_body(request, MetadataRequest)
        collection = service.collection(body.indice_name)
        if len(body.ids) > config.max_k:
            raise BadRequest(f"at most {config.max_k} ids per request")
        records = await run_in_threadpool(collection.index.get_by_key, body.ids)
        base = str(request.base_url)
        out = []
        for key, record in zip(body.ids, records):
            if record is None:
                continue
            meta = {k: v for k, v in record.items() if k not in ("path", "mtime", "size")}
            meta["item_id"] = meta.pop("id")
            if record.get("path"):
                meta["image_path"] = record["path"]
                meta["url"] = f"{base}image/{key}?index={collection.name}"
            out.append({"id": key, "metadata": meta})
        return out

    # -- clipkit's own -----------------------------------------------------------------------------

    @app.post("/search", summary="Search by text, image (JSON base64 or multipart upload), vector or item id",
              openapi_extra=_schema(SearchRequest))
    async def search(request: Request):
        start = time.perf_counter()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            body, upload = await _form_body(request)
        else:
            body, upload = await _json_body(request, SearchRequest), None
        collection = service.collection(body.index)
        sources = [name for name, value in (("text", body.text), ("image", upload if upload is not None else body.image),
                                            ("embedding", body.embedding), ("id", body.id)) if value not in (None, "")]
        if len(sources) != 1:
            raise BadRequest("give exactly one of text, image, embedding or id"
                             + (f" (got {', '.join(sources)})" if sources else ""))
        source = sources[0]
        if source == "text":
            kind, value = TEXT, body.text
        elif source == "image":
            data = upload if upload is not None else _b64decode(body.image)
            kind, value = IMAGE, await service.decode_upload(data, collection)
        elif source == "embedding":
            kind, value = VECTOR, body.embedding
        else:
            kind, value = ITEM, body.id
        results = await service.search(collection, kind, value, body.k, rerank=body.rerank, rerank_k=body.rerank_k,
                                       weight=body.weight)
        return {"index": collection.name, "query": source, "reranked": body.rerank, "results": results,
                "took_ms": round(1000 * (time.perf_counter() - start), 2)}

    async def _form_body(request: Request) -> tuple[SearchRequest, bytes | None]:
        try:
            form = await request.form(max_files=1, max_fields=20)
        except BodyTooLarge:
            raise
        except Exception as exc:  # malformed multipart
            raise BadRequest(f"malformed multipart form: {exc}") from None
        fields: dict[str, Any] = {}
        upload = None
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                if name != "image":
                    raise BadRequest(f"unexpected file field {name!r}; send the image as 'image'")
                upload = await value.read()
            else:
                fields[name] = value
        if "rerank" in fields:
            fields["rerank"] = str(fields["rerank"]).lower() in ("1", "true", "on", "yes")
        try:
            body = SearchRequest.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise BadRequest(f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg')}", 422) from None
        if upload is not None and not upload:
            raise BadRequest("the uploaded image is empty")
        return body, upload

    @app.get("/image/{item_id}", summary="The image file of an indexed item", response_class=FileResponse)
    async def image(item_id: int, index: str | None = None):
        collection = service.collection(index)
        path = await run_in_threadpool(service.file_of, collection, item_id)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600",
                                                                  "X-Content-Type-Options": "nosniff"})

    @app.get("/thumbnail/{item_id}", summary="A JPEG thumbnail of an indexed item")
    async def thumbnail(item_id: int, index: str | None = None, size: int = Query(256, ge=16, le=1024)):
        collection = service.collection(index)
        data = await run_in_threadpool(service.thumbnail, collection, item_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


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


def parse_index_spec(spec: str) -> tuple[str, str]:
    """`PATH` or `NAME=PATH` -> (name, path); the name defaults to the folder's name without `.clipkit`.
    A spec that exists as a path is a path, even with '=' in it."""
    name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
    return name or Path(path).name.removesuffix(".clipkit") or "index", path


def load_indexes(specs: list[str]) -> dict[str, Index]:
    """`PATH` or `NAME=PATH` specs -> name -> loaded Index (names from folder names, made unique)."""
    out: dict[str, Index] = {}
    for spec in specs:
        name, path = parse_index_spec(spec)
        base, n = name, 2
        while name in out:
            name, n = f"{base}-{n}", n + 1
        out[name] = Index.load(path)
    return out


def serve(index_specs: list[str], *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None,
          device: str | None = None, log_level: str = "info") -> None:
    """Load the indexes and their models once, then serve until interrupted."""
    import uvicorn

    indexes = load_indexes(index_specs)
    if device is not None:  # each index's own model, on the device asked for (loaded once per model)
        loaded: dict[tuple, object] = {}
        for index in indexes.values():
            info = index.model_info or {}
            if info:
                key = (info["name"], info.get("pretrained"))
                loaded[key] = index_model(index, loaded.get(key), device=device)
    app = create_app(indexes, config=config)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
