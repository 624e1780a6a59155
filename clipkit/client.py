"""Searching a running `clipkit serve` from here (`clipkit search --server URL`): the server's index, model and
search path, without importing torch or loading a model in this process: a query answered in a fraction of
a second where starting them takes seconds. Standard library only (urllib): any Python with clipkit installed
can be a client."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from typing import Any

from clipkit.hit import Hit

TOKEN_VARIABLE = "CLIPKIT_SERVE_TOKEN"


class ServerError(ValueError):
    """The server refused a query (its one-line `detail`; `status`: the HTTP status), or could not be reached
    (`status` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status

    @property
    def every_query(self) -> bool:
        """Whether every query would fail alike: the server unreachable, or the token refused."""
        return self.status in (None, 401)


class Server:
    """A running `clipkit serve` at `url` (its token: `token`, else $CLIPKIT_SERVE_TOKEN); `index` names one of
    the indexes it serves (None: its first)."""

    def __init__(self, url: str, *, token: str | None = None, index: str | None = None, timeout: float = 120.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--server takes the URL `clipkit serve` printed (http://HOST:PORT/), got {url!r}")
        self.url = url.rstrip("/") + "/"
        self.token = token if token is not None else os.environ.get(TOKEN_VARIABLE)
        self.index, self.timeout = index, timeout

    def search(self, query: str | bytes | None = None, k: int = 10, *, item: str | None = None,
               rerank: bool = False, rerank_k: int | None = None, modality: str = "image",
               under: str | None = None) -> list[Hit]:
        """The server's top `k` hits for a text (`str`), an image file's bytes (`bytes`) or, given `item`, the
        stored embedding of the item with that id (a hit's `id`: more like this one), as its `clipkit.search`
        gives them."""
        if (query is None) == (item is None):
            raise ValueError("give a query (a text, or an image's bytes) or an item's id, not both")
        body: dict[str, Any] = {"k": k, "rerank": rerank, "modality": modality}
        if item is not None:
            body["item"] = item
        elif isinstance(query, bytes):
            body["image"] = base64.b64encode(query).decode()
        elif not query.strip():
            raise ValueError("the text query is empty")
        else:
            body["text"] = query
        body.update({name: value for name, value in (("rerank_k", rerank_k), ("index", self.index),
                                                     ("under", under)) if value is not None})
        answer = self._post("search", body)
        return [Hit(r["item_id"], r["score"], r.get("path"), _metadata(r), r["id"]) for r in answer["results"]]

    def _post(self, route: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + route, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(_refusal(exc, self.token), exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"cannot reach the server at {self.url} ({reason}): is `clipkit serve` running "
                              "there?") from None


def _metadata(result: dict) -> dict:
    """A result's metadata as `Hit.metadata` holds it: its caption and its ITC score before re-ranking."""
    return {name: result[name] for name in ("caption", "itc_score", "url") if name in result}


def _refusal(error: urllib.error.HTTPError, token: str | None) -> str:
    """The one line a refused request says: the server's `detail`, and for a 401 what to do."""
    try:
        detail = json.loads(error.read()).get("detail")
    except (ValueError, OSError, AttributeError):
        detail = None
    if error.code == 401:
        return ("the server refused the token in $CLIPKIT_SERVE_TOKEN" if token else
                "the server needs its token: set CLIPKIT_SERVE_TOKEN to it (the ?token= of the link it printed)")
    if isinstance(detail, list):  # (FastAPI's validation errors)
        detail = "; ".join(str(item.get("msg", item)) for item in detail)
    return f"the server answered {error.code}: {detail or error.reason}"
