"""The HTTP routes: the web page, clip-retrieval's protocol (/indices-list, /knn-service, /metadata) and
clipkit's own (/search, /image, /thumbnail, /healthz), over the app's `Service` (`request.app.state.service`)."""

from __future__ import annotations

import mimetypes
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import ValidationError

from clipkit.serve.service import (ITEM, STATIC_DIR, VECTOR, BadRequest, BodyTooLarge, Collection, KnnRequest,
                                   MetadataRequest, SearchRequest, Service, _b64decode, _deduplicate, _json_body,
                                   _schema)
from clipkit.serve.batcher import IMAGE, TEXT
from clipkit.serve.fetch import FetchError, fetch_image_bytes

router = APIRouter()


# -- the page --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


@router.get("/healthz", summary="Liveness, the served indexes and the limits")
async def healthz(request: Request):
    service = request.app.state.service
    return service.info()


# -- clip-retrieval's protocol ----------------------------------------------------------------


@router.get("/indices-list", summary="clip-retrieval: the index names")
async def indices_list(request: Request):
    service = request.app.state.service
    return list(service.collections)


@router.post("/knn-service", summary="clip-retrieval: nearest neighbours of a text, image, URL or embedding",
             openapi_extra=_schema(KnnRequest))
async def knn_service(request: Request):
    service = request.app.state.service
    body = await _json_body(request, KnnRequest)
    collection = service.collection(body.indice_name)
    kind, value = await _knn_query(service, body, collection)
    count = min(body.num_images, service.config.max_k)
    # candidates to search: num_result_ids as clip-retrieval, else enough to fill num_images after dedup
    wanted = body.num_result_ids or (4 * count if body.deduplicate else count)
    depth = min(max(wanted, count), service.config.max_k)
    results = await service.search(collection, kind, value, depth, modality=body.modality)
    if body.deduplicate:
        searched = collection.index.captions if body.modality == "text" else collection.index
        results = await run_in_threadpool(_deduplicate, searched, results)
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


async def _knn_query(service: Service, body: KnnRequest, collection: Collection) -> tuple[str, Any]:
    if body.text:  # clip-retrieval's page sends text "" beside an image
        return TEXT, body.text
    if body.image:
        return IMAGE, await service.decode_upload(_b64decode(body.image), collection)
    if body.image_url:
        if not service.config.allow_image_urls:
            raise BadRequest("this server does not fetch image_url (start it with --allow-image-urls)", 403)
        try:
            data = await run_in_threadpool(fetch_image_bytes, body.image_url, service.config.max_body_bytes)
        except FetchError as exc:
            raise BadRequest(str(exc)) from None
        return IMAGE, await service.decode_upload(data, collection)
    if body.embedding_input is not None:
        return VECTOR, body.embedding_input
    raise BadRequest("give one of text, image, image_url or embedding_input")


@router.post("/metadata", summary="clip-retrieval: metadata of items by id", openapi_extra=_schema(MetadataRequest))
async def metadata(request: Request):
    service = request.app.state.service
    body = await _json_body(request, MetadataRequest)
    collection = service.collection(body.indice_name)
    if len(body.ids) > service.config.max_k:
        raise BadRequest(f"at most {service.config.max_k} ids per request")
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


@router.post("/search", summary="Search by text, image (JSON base64 or multipart upload), vector or item id",
             openapi_extra=_schema(SearchRequest))
async def search(request: Request):
    service = request.app.state.service
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
                                   weight=body.weight, modality=body.modality)
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


@router.get("/image/{item_id}", summary="The image file of an indexed item", response_class=FileResponse)
async def image(request: Request, item_id: int, index: str | None = None):
    service = request.app.state.service
    collection = service.collection(index)
    path = await run_in_threadpool(service.file_of, collection, item_id)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600",
                                                              "X-Content-Type-Options": "nosniff"})


@router.get("/thumbnail/{item_id}", summary="A JPEG thumbnail of an indexed item")
async def thumbnail(request: Request, item_id: int, index: str | None = None,
                    size: int = Query(256, ge=16, le=1024)):
    service = request.app.state.service
    collection = service.collection(index)
    data = await run_in_threadpool(service.thumbnail, collection, item_id, size)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

