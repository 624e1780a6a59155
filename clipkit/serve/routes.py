"""clipkit's own HTTP routes: the web page, /search, /image, /thumbnail and /healthz, over the app's `Service`
(`request.app.state.service`). clip-retrieval's protocol is in `clipkit.serve.clip_retrieval`."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from clipkit.serve.clip_retrieval import status as clip_retrieval_status
from clipkit.serve.batcher import IMAGE, TEXT
from clipkit.serve.service import (ITEM, STATIC_DIR, VECTOR, BadRequest, BodyTooLarge, SearchRequest, _b64decode,
                                   _json_body, _schema, validated)

router = APIRouter()


# -- the page --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


@router.get("/healthz", summary="Liveness, the served indexes and the limits")
async def healthz(request: Request):
    service = request.app.state.service
    return {**service.info(), "clip_retrieval": clip_retrieval_status(service)}


# -- clipkit's own -----------------------------------------------------------------------------


@router.post("/search", summary="Search by text, image (JSON base64, multipart upload, or the body itself with its "
             "options as query parameters), vector or item id",
             openapi_extra=_schema(SearchRequest))
async def search(request: Request):
    service = request.app.state.service
    start = time.perf_counter()
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        body, upload = await _form_body(request)
    elif content_type.startswith(("image/", "application/octet-stream")):  # `curl --data-binary @q.jpg`
        body, upload = _fields_body(dict(request.query_params), await request.body())
    else:
        body, upload = await _json_body(request, SearchRequest), None
    collection = service.collection(body.index)
    sources = [name for name, value in (("text", body.text), ("image", upload if upload is not None else body.image),
                                        ("embedding", body.embedding), ("id", body.id), ("item", body.item))
               if value not in (None, "")]
    if not sources and body.text is not None:
        raise BadRequest("the text query is empty")
    if len(sources) != 1:
        raise BadRequest("give exactly one of text, image, embedding, id or item"
                         + (f" (got {', '.join(sources)})" if sources else ""))
    source = sources[0]
    if source == "text":
        kind, value = TEXT, body.text
    elif source == "image":
        data = upload if upload is not None else _b64decode(body.image)
        kind, value = IMAGE, await service.decode_upload(data, collection)
    elif source == "embedding":
        kind, value = VECTOR, body.embedding
    elif source == "item":
        kind, value = ITEM, service.item_key(collection, body.item)
    else:
        kind, value = ITEM, body.id
    results = await service.search(collection, kind, value, body.k, rerank=body.rerank, rerank_k=body.rerank_k,
                                   weight=body.weight, modality=body.modality, under=body.under)
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
    return _fields_body(fields, upload)


def _fields_body(fields: dict[str, Any], upload: bytes | None) -> tuple[SearchRequest, bytes | None]:
    """A search's options sent as text fields (a form's, or query parameters beside an image sent as the body),
    with the image's bytes."""
    if "rerank" in fields:
        fields["rerank"] = str(fields["rerank"]).lower() in ("1", "true", "on", "yes")
    body = validated(SearchRequest, fields)
    if upload is not None and not upload:
        raise BadRequest("the uploaded image is empty")
    return body, upload


@router.get("/image/{item_id}", summary="The image of an indexed item (its file, or its member of a shard)",
            response_class=Response)
async def image(request: Request, item_id: int, index: str | None = None):
    service = request.app.state.service
    collection = service.collection(index)
    data, media_type = await run_in_threadpool(service.image_bytes, collection, item_id)
    headers = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}
    return Response(data, media_type=media_type, headers=headers)


@router.get("/thumbnail/{item_id}", summary="A JPEG thumbnail of an indexed item")
async def thumbnail(request: Request, item_id: int, index: str | None = None,
                    size: int = Query(256, ge=16, le=1024)):
    service = request.app.state.service
    collection = service.collection(index)
    data = await run_in_threadpool(service.thumbnail, collection, item_id, size)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

