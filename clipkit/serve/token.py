"""A shared secret for a server others can reach: `clipkit serve --host 0.0.0.0 --token auto`.

Without it, anyone who reaches the port searches the indexes and views every indexed image. With it, every
request shows the token, one of three ways: `Authorization: Bearer TOKEN` (programs), `?token=TOKEN` on any
URL (a link to the page, clip-retrieval's client given `.../knn-service?token=TOKEN`), or the `clipkit_token`
cookie that such a link sets, so that the page's own requests and its `<img>` tags carry it. Anything else is
a 401. CORS preflights pass (browsers send them without credentials; the CORS layer answers them).
"""

from __future__ import annotations

import hmac
import html
import ipaddress
import json
import logging
import re
import secrets
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, parse_qsl, urlencode

COOKIE = "clipkit_token"
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{16,256}")  # URL- and cookie-safe, long enough not to be guessed


def server_token(given: str | None) -> str | None:
    """The token to require: None (none given), a new random one for "auto", else `given` once checked."""
    if not given:
        return None
    if given == "auto":
        return secrets.token_urlsafe(24)
    if not TOKEN_PATTERN.fullmatch(given):  # (also what TokenGate takes)
        raise ValueError("a server token is 16 to 256 letters, digits, '.', '_', '~' or '-' (--token auto "
                         "makes one: `python -c \"import secrets; print(secrets.token_urlsafe(24))\"` too)")
    return given


def check_token(token: str) -> str:
    """`token` when it can be a server's token (ServeConfig.token), else a ValueError."""
    if token == "auto" or server_token(token) != token:  # ("auto" made here would be known to nobody)
        raise ValueError("ServeConfig.token: give the token itself (16 to 256 letters, digits, '.', '_', '~', '-'); "
                         "clipkit.serve.token.server_token('auto') makes one")
    return token


def is_loopback(host: str) -> bool:
    """Whether `host` (a --host value) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HideToken(logging.Filter):
    """Access-log lines with `token=...` in their path show `token=(hidden)`: a log is read by more people than
    the token is meant for."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(re.sub(r"([?&]token=)[^&\s]*", r"\1(hidden)", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


class TokenGate:
    """ASGI middleware: requests that do not show `token` are answered 401 (see the module's docstring)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, check_token(token).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # (clipkit has no websocket route: none passes ungated either)
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http" or scope["method"] == "OPTIONS":  # (lifespan; CORS preflights)
            return await self.app(scope, receive, send)
        headers = {name.lower(): value.decode("latin-1") for name, value in scope.get("headers") or []}
        in_query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        if self._is_token(in_query):
            if scope["method"] == "GET" and "text/html" in headers.get(b"accept", ""):  # a browser opened the link
                return await self._welcome(scope, send)
            return await self.app(scope, receive, self._setting_cookie(send, scope.get("scheme") == "https"))
        scheme, _, bearer = headers.get(b"authorization", "").strip().partition(" ")
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get(b"cookie", ""))
        except CookieError:  # (a malformed Cookie header: no cookie)
            cookie = SimpleCookie()
        shown = cookie[COOKIE].value if COOKIE in cookie else ""
        if (scheme.lower() == "bearer" and self._is_token(bearer.strip())) or self._is_token(shown):
            return await self.app(scope, receive, send)
        await self._refuse(send, page="text/html" in headers.get(b"accept", ""), query=scope.get("query_string", b""))

    async def _welcome(self, scope, send):
        """The cookie set, and a redirect to the same URL without the token: out of the address bar, the
        browser's history and the access log's later lines."""
        query = [(name, value) for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                            keep_blank_values=True) if name != "token"]
        # relative to the URL the browser asked for (behind a reverse proxy at /photos/, the server's "/" is that)
        location = (scope["path"].rsplit("/", 1)[-1] or "./") + (f"?{urlencode(query)}" if query else "")
        start = {"type": "http.response.start", "status": 303,
                 "headers": [(b"location", location.encode("latin-1", "replace")), (b"content-length", b"0")]}
        await self._setting_cookie(send, scope.get("scheme") == "https")(start)
        await send({"type": "http.response.body", "body": b""})

    def _is_token(self, shown: str) -> bool:
        return bool(shown) and hmac.compare_digest(shown.encode("latin-1", "replace"), self.token)

    def _setting_cookie(self, send, secure: bool = False):
        """`send`, with the token's cookie added to the response (a link with ?token=: the page then carries it;
        `secure`: over https only)."""
        cookie = f"{COOKIE}={self.token.decode()}; Path=/; HttpOnly; SameSite=Strict{'; Secure' * secure}".encode()

        async def with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return with_cookie

    @staticmethod
    async def _refuse(send, page: bool = False, query: bytes = b""):
        """A 401: for a browser, a page asking for the token (it reloads the same URL, `query` and all, with
        ?token=); else JSON."""
        if page:
            kept = "".join(f'<input type="hidden" name="{html.escape(name)}" value="{html.escape(value)}">'
                           for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True)
                           if name != "token")
            body, kind = ASK_PAGE.replace("<!--kept-->", kept).encode(), b"text/html; charset=utf-8"
        else:
            body = json.dumps({"detail": "this server needs its token: an 'Authorization: Bearer TOKEN' header, or "
                                         "?token=TOKEN on the URL (the link `clipkit serve` printed)"}).encode()
            kind = b"application/json"
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


ASK_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>clipkit: token needed</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto; padding: 0 1rem">
<h1 style="font-size: 1.3rem">This clipkit server needs its token</h1>
<p>Open the link <code>clipkit serve</code> printed, or enter the token:</p>
<form method="get"><input name="token" type="password" autocomplete="current-password" autofocus
aria-label="token" required style="width: 70%"><!--kept--> <button type="submit">Open</button></form>
</body></html>
"""
