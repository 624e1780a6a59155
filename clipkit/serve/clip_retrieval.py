"""clip-retrieval's back-end protocol over clipkit indexes: /indices-list, /knn-service, /metadata, and its
front end's /front/config.json when `clipkit serve --front DIR` serves that front end.

What is honoured, as clip-retrieval's own back end does it: text, image (base64), image_url and
embedding_input queries; `modality` "image" (the images) or "text" (the captions indexed beside them);
`num_result_ids` results of which the first `num_images` carry their metadata (the front end pages
through the rest with /metadata); `deduplicate`. An `image_url` that is one of this server's own image
URLs is answered from the stored embedding, without any fetch. What clipkit does not implement
(`UNSUPPORTED`) is accepted, so that clip-retrieval's clients keep working, but never as if honoured:
each reply that asked for one names it in the `X-Clipkit-Unsupported` header, /healthz lists them, and
the server logs them once.

Ids: an image result's id is its item's index key; a caption result's id is `CAPTION_ID_BASE` plus the
caption's key in the caption collection, so the two never collide and /metadata can tell them apart.
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from clipkit.index.captions import first_captions
from clipkit.index.shards import item_image
from clipkit.serve.batcher import IMAGE, TEXT
from clipkit.data.fetch import FetchBusy, FetchError
from clipkit.serve.service import (VECTOR, BadRequest, Collection, Float, Int, Service, _b64decode, _deduplicate,
                                   _json_body, _schema)

log = logging.getLogger("clipkit.serve")
router = APIRouter()

CAPTION_ID_BASE = 1 << 48  # caption result ids; below 2**53, so exact in JavaScript numbers too

UNSUPPORTED = {
    "use_mclip": "no multilingual CLIP: texts are embedded by the index's own model",
    "use_safety_model": "no NSFW safety model: results are not filtered",
    "use_violence_detector": "no violence detector: results are not filtered",
    "aesthetic_score": "no aesthetic embeddings: results are not shifted toward an aesthetic score "
                       "(aesthetic_weight goes with it)",
}


def status(service: Service) -> dict:
    """What /healthz says of the clip-retrieval protocol."""
    return {"front": "front/" if service.config.front_dir else None, "inline_images": service.config.inline_images,
            "max_result_ids": service.config.max_result_ids, "unsupported": UNSUPPORTED}


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str | None = None
    image: str | None = Field(None, description="base64-encoded image file")
    image_url: str | None = Field(None, description="an image URL: this server's own /image URLs are answered from "
                                                    "the stored embedding; others only with --allow-image-urls")
    embedding_input: list[Float] | None = None
    modality: Literal["image", "text"] = Field("image", description="search the images, or the captions")
    num_images: Int = Field(40, ge=1, description="results that carry their metadata")
    num_result_ids: Int | None = Field(None, ge=1, description="results in all (default: num_images)")
    indice_name: str | None = None
    deduplicate: bool = False
    use_mclip: bool | None = Field(False, description="not supported (see /healthz)")
    use_safety_model: bool | None = Field(False, description="not supported (see /healthz)")
    use_violence_detector: bool | None = Field(False, description="not supported (see /healthz)")
    aesthetic_score: int | str | None = Field(None, description="not supported (see /healthz)")
    aesthetic_weight: float | str | None = None

    def unsupported(self) -> list[str]:
        """The options asked for that clipkit does not implement."""
        return [name for name in UNSUPPORTED if getattr(self, name) not in (None, False, "")]


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[Int]
    indice_name: str | None = None


@router.get("/indices-list", summary="clip-retrieval: the index names")
async def indices_list(request: Request):
    return list(request.app.state.service.collections)


@router.post("/knn-service", summary="clip-retrieval: nearest neighbours of a text, image, URL or embedding",
             openapi_extra=_schema(KnnRequest))
async def knn_service(request: Request):
    service: Service = request.app.state.service
    body = await _json_body(request, KnnRequest)
    collection = service.collection(body.indice_name)
    base = str(request.base_url)
    kind, value = await _knn_query(service, body, collection, base)
    count = min(body.num_images, service.config.max_k)
    total = min(max(body.num_result_ids or count, count), service.config.max_result_ids)
    depth = min(max(total, 4 * count) if body.deduplicate else total, service.config.max_result_ids)
    results = await service.search(collection, kind, value, depth, modality=body.modality,
                                   max_k=service.config.max_result_ids)
    if body.deduplicate:
        searched = collection.index.captions if body.modality == "text" else collection.index
        results = await run_in_threadpool(_deduplicate, searched, results)
    results = results[:total]
    ids = [CAPTION_ID_BASE + r["caption_id"] if "caption_id" in r else r["id"] for r in results]
    described = await run_in_threadpool(describe, service, collection, ids[:count], base)
    out = [{**described.get(i, {}), "id": i, "similarity": r["score"]} for i, r in zip(ids, results)]
    unsupported = body.unsupported()
    if unsupported:
        service.note_unsupported(unsupported, UNSUPPORTED)
    return JSONResponse(out, headers={"X-Clipkit-Unsupported": ",".join(unsupported)} if unsupported else {})


async def _knn_query(service: Service, body: KnnRequest, collection: Collection, base: str) -> tuple[str, Any]:
    if body.text:  # clip-retrieval's page sends text "" beside an image
        return TEXT, body.text
    if body.image:
        return IMAGE, await service.decode_upload(_b64decode(body.image), collection)
    if body.image_url:
        own = own_item(service, body.image_url, base)
        if own is not None:
            return await _own_item_query(service, collection, *own)
        if not service.config.allow_image_urls:
            raise BadRequest("this server does not fetch image_url other than its own image URLs (start it with "
                             "--allow-image-urls to fetch public http(s) images)", 403)
        try:
            data = await run_in_threadpool(service.fetcher.fetch, body.image_url)
        except FetchError as exc:
            raise BadRequest(str(exc), 503 if isinstance(exc, FetchBusy) else 400) from None
        return IMAGE, await service.decode_upload(data, collection)
    if body.embedding_input is not None:
        return VECTOR, body.embedding_input
    raise BadRequest("give one of text, image, image_url or embedding_input")


def own_item(service: Service, url: str, base: str) -> tuple[Collection, int] | None:
    """(collection, key) when `url` is one of this server's own image or thumbnail URLs, else None."""
    parts, here = urlsplit(url), urlsplit(base)
    if parts.scheme or parts.netloc:  # absolute: this server's scheme, host and port, under its root path
        if (parts.scheme, parts.netloc) != (here.scheme, here.netloc) or not parts.path.startswith(here.path):
            return None
        path = parts.path[len(here.path):]
    else:  # relative, as /search's image_url
        path = parts.path.lstrip("/")
    match = re.fullmatch(r"(?:image|thumbnail)/(\d+)", path)
    if match is None:
        return None
    name = parse_qs(parts.query).get("index", [None])[0]
    return service.collection(name), int(match.group(1))


async def _own_item_query(service: Service, target: Collection, source: Collection, key: int) -> tuple[str, Any]:
    """The query for one of this server's own images: its stored embedding when the two indexes share a
    model, else its file embedded by the searched index's model."""
    record = source.index.get_by_key([key])[0]
    if record is None:
        raise BadRequest(f"no image with id {key} in index {source.name!r}", 404)
    if source.model.fingerprint == target.model.fingerprint:
        return VECTOR, source.index.embeddings([record["id"]])[0]
    data, _ = await run_in_threadpool(service.image_bytes, source, key)
    return IMAGE, await service.decode_upload(data, target)


def describe(service: Service, collection: Collection, ids: list[int], base: str) -> dict[int, dict]:
    """clip-retrieval's metadata of result ids: {image_path, url, caption} where the item has them (and
    `image`, a base64 JPEG, when the server inlines images). Ids that are no longer there are left out."""
    index = collection.index
    rows = [(r["key"], r, r.get("caption")) for r in index.get_by_key([i for i in ids if i < CAPTION_ID_BASE])
            if r is not None]
    if index.captions is not None and any(i >= CAPTION_ID_BASE for i in ids):
        captions = [c for c in index.captions.get_by_key([i - CAPTION_ID_BASE for i in ids if i >= CAPTION_ID_BASE])
                    if c is not None]
        images = index.find([c["image_id"] for c in captions])
        rows += [(CAPTION_ID_BASE + c["key"], images[c["image_id"]], c["caption"]) for c in captions
                 if c["image_id"] in images]
    firsts = {image_id: c["caption"] for image_id, c in
              first_captions(index.captions, [image["id"] for _, image, caption in rows if caption is None]).items()}
    out = {}
    for result_id, image, caption in rows:
        meta = {}
        if image.get("path"):
            meta["image_path"] = image["path"]
        if item_image(image.get("path"), image) is not None:
            meta["url"] = f"{base}image/{image['key']}?index={quote(collection.name)}"
            if service.config.inline_images:
                meta.update(_inline(service, collection, image["key"]))
        caption = caption if caption is not None else firsts.get(image["id"])
        if caption is not None:
            meta["caption"] = caption
        out[result_id] = meta
    return out


def _inline(service: Service, collection: Collection, key: int) -> dict:
    """{'image': base64 JPEG thumbnail} of an item (as clip-retrieval's back end inlines images), or {}."""
    try:
        data = service.thumbnail(collection, key, service.config.inline_images)
    except BadRequest:  # the file went or cannot be read: the result keeps its url
        return {}
    return {"image": base64.b64encode(data).decode("ascii")}


@router.post("/metadata", summary="clip-retrieval: metadata of result ids", openapi_extra=_schema(MetadataRequest))
async def metadata(request: Request):
    service: Service = request.app.state.service
    body = await _json_body(request, MetadataRequest)
    collection = service.collection(body.indice_name)
    if len(body.ids) > service.config.max_k:
        raise BadRequest(f"at most {service.config.max_k} ids per request")
    described = await run_in_threadpool(describe, service, collection, body.ids, str(request.base_url))
    return [{"id": i, "metadata": described[i]} for i in body.ids if i in described]


@router.get("/front/config.json", include_in_schema=False)
async def front_config(request: Request):
    """clip-retrieval's front end reads its back end and index from here: this server, its first index."""
    service: Service = request.app.state.service
    return {"defaultBackend": str(request.base_url).rstrip("/"), "defaultIndex": next(iter(service.collections)),
            "urlColumn": "url"}
