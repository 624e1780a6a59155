"""The HTTP service: clip-retrieval's protocol, clipkit's own search API, image files and the web page.

    clipkit serve --index photos.clipkit [--index other=path] [--host 127.0.0.1] [--port 8000]

Items are addressed over HTTP by their index key, a stable integer (clip-retrieval's ids are
integers too); files are served only for items in an index, looked up by that key, never by a path
taken from the request. Bad input is a 4xx with a one-line `detail`, never a 5xx.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from clipkit import __version__
from clipkit.errors import ClipkitError
from clipkit.index import Index
from clipkit.rerankers import load_reranker
from clipkit.search import index_model
from clipkit.serve.batcher import Batcher, ModelWorker
from clipkit.serve.clip_retrieval import router as clip_retrieval_router
from clipkit.serve.routes import router
from clipkit.serve.service import STATIC_DIR, BodyTooLarge, Collection, ServeConfig, Service
from clipkit.serve.token import HideToken, TokenGate, check_token, is_loopback


# ---------------------------------------------------------------------------------------------
# Request-size limit


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


class CollapseSlashes:
    """ASGI middleware: `//knn-service` is `/knn-service` (clip-retrieval's front end, given a back-end URL
    ending in a slash, calls such paths; its own back end answers them)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = {**scope, "path": re.sub("/{2,}", "/", scope["path"])}
            scope["raw_path"] = scope["path"].encode()
        return await self.app(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# The app


def create_app(indexes: dict[str, Index] | Index, *, model=None, config: ServeConfig | None = None,
               reranker=None) -> FastAPI:
    """A FastAPI app serving `indexes` (name -> Index; one Index is served as 'default').

    Each index's queries are embedded by its own model (or `model`, checked against it); indexes
    built by the same model share one model thread and one batcher. `reranker` (`clipkit.load_reranker`)
    re-ranks rerank=true queries instead of each model's own ITM head.
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
    service = Service(collections_, config, reranker=load_reranker(reranker) if reranker is not None else None)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await service.searcher.close()
        for worker, batcher in workers.values():
            await batcher.close()
            worker.close()

    app = FastAPI(title="clipkit", version=__version__, lifespan=lifespan,
                  description="Text and image search over clipkit indexes; clip-retrieval compatible.")
    app.state.service = service
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(CollapseSlashes)
    if config.token:  # (inside CORS: its preflights are answered without the token, as browsers send them)
        app.add_middleware(TokenGate, token=check_token(config.token))
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["X-Clipkit-Unsupported"])

    @app.exception_handler(ClipkitError)
    async def clipkit_error(request: Request, exc: ClipkitError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    app.include_router(clip_retrieval_router)
    if config.front_dir:  # after /front/config.json, which the router answers
        app.mount("/front", StaticFiles(directory=check_front_dir(config.front_dir), html=True), name="front")
    return app


def check_front_dir(front_dir: str) -> Path:
    """The folder of clip-retrieval's front end build (its index.html and main.*.js), or a ValueError."""
    path = Path(front_dir)
    if not (path / "index.html").is_file() or not any(path.glob("main*.js")):
        raise ValueError(f"--front {front_dir}: not a clip-retrieval front end build (no index.html and main.*.js "
                         "there); it is the front/build folder of the clip-retrieval package, or of `npm run build` "
                         "in its front/ folder")
    return path


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
          device: str | None = None, log_level: str = "info", reranker: str | None = None,
          tls: tuple[str, str | None] | None = None, show_token: bool = False) -> None:
    """Load the indexes and their models once, then serve until interrupted (https with `tls`, the certificate
    and key files). The certificate is checked and the port taken first, so that either is a one-line error
    before seconds of loading. `show_token`: the printed link carries the token (one made for this run)."""
    import uvicorn

    if tls is not None:
        check_tls(*tls)
    listener = listen(host, port)
    indexes = load_indexes(index_specs)
    if device is not None:  # each index's own model, on the device asked for (loaded once per model)
        loaded: dict[tuple, object] = {}
        for index in indexes.values():
            info = index.model_info or {}
            if info:
                key = (info["name"], info.get("pretrained"))
                loaded[key] = index_model(index, loaded.get(key), device=device)
    app = create_app(indexes, config=config,
                     reranker=load_reranker(reranker, device=device) if reranker is not None else None)
    address = f"{'https' if tls else 'http'}://{f'[{host}]' if ':' in host else host}:{listener.getsockname()[1]}"
    token = bool(config is not None and config.token)
    _announce(address, host, config or ServeConfig(), tls=tls is not None, quiet=log_level == "warning",
              show_token=show_token)
    certificate, key = tls or (None, None)
    settings = uvicorn.Config(app, log_level=log_level, ssl_certfile=certificate, ssl_keyfile=key)
    if token:  # (after uvicorn configured its loggers)
        logging.getLogger("uvicorn.access").addFilter(HideToken())
    uvicorn.Server(settings).run(sockets=[listener])


def _announce(address: str, host: str, config: ServeConfig, *, tls: bool, quiet: bool, show_token: bool) -> None:
    """Where the server is (the link carrying its token when `show_token`: printed even when `quiet`, or nobody
    could open it), and a word when it is reachable beyond this machine without a token, or in clear."""
    if not is_loopback(host) and not config.token:
        print(f"warning: serving on {host} without --token: whoever reaches {address} searches the indexes and "
              "views every indexed image (--token auto makes a link that opens it)", file=sys.stderr, flush=True)
    elif not is_loopback(host) and not tls:
        print(f"note: the token and the images cross the network in clear (plain http on {host}): --tls-cert and "
              "--tls-key serve https, or put an https reverse proxy in front", file=sys.stderr, flush=True)
    link = f"?token={config.token}" if show_token and config.token else ""
    if not quiet or link:
        needs = " (with its token: ?token=TOKEN, or an Authorization: Bearer header)" if config.token and not link \
            else ""
        print(f"serving {address}/{link}{needs} (Ctrl+C stops)", flush=True)
        if host in ("0.0.0.0", "::", ""):  # (every interface: a link others can open)
            import socket

            scheme, port = address.partition("://")[0], address.rpartition(":")[2]
            print(f"  from other machines: {scheme}://{socket.gethostname()}:{port}/{link}", flush=True)
        if config.front_dir:
            print(f"clip-retrieval's front end: {address}/front/{link}", flush=True)


def check_tls(certificate: str, key: str | None) -> None:
    """FileNotFoundError or ValueError, with what to do, unless `certificate` and `key` serve https."""
    import ssl

    for path in (certificate, key):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"no TLS certificate or key file at {path}")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"cannot serve https with {certificate}{f' and {key}' if key else ''}: "
                         f"{getattr(exc, 'reason', None) or exc} (a PEM certificate and its private key: "
                         "--tls-key KEY when the key is in a file of its own)") from None


def listen(host: str, port: int):
    """A socket bound to (host, port) as uvicorn binds one; what stops it is said with what to do."""
    import errno
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (socket.gaierror, UnicodeError) as exc:
        sock.close()
        raise ValueError(f"cannot serve on {host}:{port}: {getattr(exc, 'strerror', None) or exc}; give --host "
                         "as an address or a name of this machine") from None
    except OSError as exc:
        sock.close()
        hint = {errno.EADDRINUSE: "another program listens there: pick another --port",
                errno.EACCES: "ports below 1024 need privileges: pick --port 8000 or another above 1023",
                errno.EADDRNOTAVAIL: "this machine has no such address: --host 127.0.0.1 (this machine) or "
                                     "0.0.0.0 (every interface)"}.get(exc.errno, "pick another --host or --port")
        raise ValueError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; {hint}") from None
    return sock
