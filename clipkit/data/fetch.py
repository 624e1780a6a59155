"""Fetching an image by URL: a query's `image_url` (the server, where it allows it: never from inside the
network), or the images of a URL table being indexed (`clipkit index urls.parquet`: the user's own list).

A URL is fetched only over http(s); for the server only when every address its host resolves to is public
(`public_only`): loopback, private, link-local (cloud metadata), multicast, reserved and unspecified
addresses are refused, for the URL and for every redirect it leads to. The connection goes to the very address that
was checked (the name is resolved once: a name that answers a public address to the check and a private
one to the connection, DNS rebinding, gets nowhere), TLS still verifies the certificate against the
name. The body is capped in size, the whole fetch (redirects included) in time, and the number of
fetches running at once is bounded, so slow servers cannot tie up the workers.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse

from clipkit._net import proxy_url

USER_AGENT = "clipkit-serve (+https://github.com/clipkit)"
MAX_REDIRECTS = 5


class FetchError(ValueError):
    """The URL is not allowed or could not be fetched (a 4xx for the client); `kind`: why, in a few words (for
    an indexing run's summary of skipped images)."""

    def __init__(self, message: str, kind: str = "fetch failed"):
        super().__init__(message)
        self.kind = kind


class FetchBusy(FetchError):
    """Too many fetches are running already (a 503 for the client)."""


def _connect(address: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to `address` (an IP address, already checked). One place, so tests can watch it."""
    return socket.create_connection((address, port), timeout=timeout)


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_global and not address.is_multicast


def _split(url: str, noun: str = "image_url") -> tuple[urllib.parse.SplitResult, str, int]:
    """(parts, host, port) of an http(s) URL, or FetchError."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise FetchError(f"{noun} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"{noun} must be http or https, got {parts.scheme or 'no scheme'!r}")
    if "@" in parts.netloc:
        raise FetchError(f"{noun} must not carry a user name or password")
    host = parts.hostname
    if not host:
        raise FetchError(f"{noun} has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError(f"{noun} has an invalid port") from None
    return parts, host, port


def resolve_public(url: str, public_only: bool = True, noun: str = "image_url"
                   ) -> tuple[urllib.parse.SplitResult, str, int, str]:
    """(parts, host, port, address) of `url`: the one address to connect to, resolved once, after every
    address the host resolves to was found public (unless not `public_only`); FetchError otherwise."""
    parts, host, port = _split(url, noun)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve the host of {noun} ({host}): {exc}", "host not found") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses if public_only else ():
        if not _is_public(address):
            raise FetchError(f"{noun} points to a non-public address "
                             f"({getattr(address, 'ipv4_mapped', None) or address}); refused")
    if not addresses:
        raise FetchError(f"the host of {noun} ({host}) has no address")
    return parts, host, port, str(addresses[0])


def check_public_url(url: str) -> None:
    """Raise FetchError unless `url` is http(s) to a host whose every address is public."""
    resolve_public(url)


class _Pinned(http.client.HTTPSConnection):
    """An HTTP(S) connection to an address checked beforehand, under the URL's host name (Host, SNI, cert)."""

    def __init__(self, host: str, port: int, address: str, timeout: float, tls: bool):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address, self.tls = address, tls
        self.expired = False  # cut off by the fetch's deadline
        self.via, self.extra_headers = "", {}  # through a proxy: what messages add, its credentials
        self.raw: socket.socket | None = None

    def connect(self):
        self.sock = _connect(self.address, self.port, self.timeout)
        if self._tunnel_host:  # through a proxy: CONNECT to the URL's host first (`set_tunnel`)
            self._tunnel()
        if self.tls:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host)
        self.raw = self.sock  # http.client drops self.sock once a reply will close it; the deadline still cuts this
        if self.expired:  # the deadline passed while connecting
            _cut(self)


def _origin_target(parts: urllib.parse.SplitResult) -> str:
    """A request's target as its host (or a tunnel to it) takes it: the path and query, never the fragment."""
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _basic_auth(proxy: urllib.parse.SplitResult) -> dict:
    """The Proxy-Authorization header of a proxy URL's user name and password (http://user:pass@host:3128)."""
    if proxy.username is None:
        return {}
    pair = f"{urllib.parse.unquote(proxy.username)}:{urllib.parse.unquote(proxy.password or '')}"
    return {"Proxy-Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def _cut(connection: _Pinned) -> None:
    """Shut a connection's socket down, so that a read blocked on it returns now."""
    connection.expired = True
    sock = connection.raw
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Fetcher:
    """Fetches image URLs: at most `concurrency` at once (more are refused at once with FetchBusy, or with
    `wait` wait for a slot), each within `deadline` seconds in all and `max_bytes` of body; `public_only`:
    to public addresses only; `noun`: what messages call the URL."""

    def __init__(self, max_bytes: int, deadline: float = 10.0, concurrency: int = 8, *, public_only: bool = True,
                 wait: bool = False, noun: str = "image_url"):
        self.max_bytes, self.deadline = max_bytes, deadline
        self.public_only, self.wait, self.noun = public_only, wait, noun
        self._slots = threading.BoundedSemaphore(concurrency)

    def fetch(self, url: str) -> bytes:
        if not self._slots.acquire(blocking=self.wait):
            raise FetchBusy(f"too many {self.noun} fetches are running; try again shortly")
        try:
            return self._fetch(url, time.monotonic() + self.deadline)
        finally:
            self._slots.release()

    def _fetch(self, url: str, deadline: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            connection, target = self._open(url, deadline)
            # a server trickling its headers or body a byte at a time is cut off at the deadline, whatever it does
            watchdog = threading.Timer(self._left(deadline), _cut, (connection,))
            watchdog.daemon = True
            watchdog.start()
            try:
                connection.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": "image/*",
                                                           **connection.extra_headers})
                response = connection.getresponse()
                if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise FetchError(f"cannot fetch {self.noun}: HTTP {response.status} {response.reason}",
                                     f"HTTP {response.status}")
                data = self._body(connection, response, deadline)
                self._check(connection)
                return data
            except FetchError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._check(connection)  # cut at the deadline: say so rather than how the cut connection failed
                raise FetchError(f"cannot fetch {self.noun}{connection.via}: {exc or type(exc).__name__}") from None
            finally:
                watchdog.cancel()
                connection.close()
        raise FetchError(f"{self.noun} redirects more than {MAX_REDIRECTS} times")

    def _open(self, url: str, deadline: float) -> tuple[_Pinned, str]:
        """(a connection, the request's target) for `url`: straight to its host, or, for the user's own URLs
        (not `public_only`: the server checks the address it connects to, which a proxy would resolve again),
        through the proxy $HTTP_PROXY / $HTTPS_PROXY / $ALL_PROXY names, as requests and img2dataset go."""
        proxy = None if self.public_only else proxy_url(url)
        if proxy is None:
            parts, host, port, address = resolve_public(url, self.public_only, self.noun)
            connection = _Pinned(host, port, address, self._left(deadline), parts.scheme == "https")
            return connection, _origin_target(parts)
        parts, host, port = _split(url, self.noun)
        through = urllib.parse.urlsplit(proxy)
        if through.scheme != "http":
            raise FetchError(f"the proxy {proxy} is not an http:// proxy (the only kind clipkit goes through)",
                             "proxy")
        bare = through._replace(netloc=through.netloc.rpartition("@")[2]).geturl()  # (its credentials apart)
        _, proxy_host, proxy_port, address = resolve_public(bare, False, "the proxy")
        connection = _Pinned(proxy_host, proxy_port, address, self._left(deadline), parts.scheme == "https")
        connection.via = f" (through the proxy {proxy_host}:{proxy_port})"
        credentials = _basic_auth(through)
        if parts.scheme == "https":  # a tunnel: TLS end to end, the certificate checked against the URL's host
            connection.set_tunnel(host, port, headers=credentials)
            return connection, _origin_target(parts)
        connection.extra_headers = credentials
        return connection, urllib.parse.urlunsplit(parts._replace(fragment=""))  # the proxy fetches it for us

    def _check(self, connection: _Pinned) -> None:
        if connection.expired:
            raise FetchError(f"{self.noun} took longer than {self.deadline:g} s to fetch", "timed out")

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"{self.noun} took longer than {self.deadline:g} s to fetch", "timed out")
        return left

    def _body(self, connection: _Pinned, response: http.client.HTTPResponse, deadline: float) -> bytes:
        """The body, read a chunk at a time, each read bounded by the time left."""
        chunks, size = [], 0
        while True:
            connection.raw.settimeout(self._left(deadline))
            try:
                chunk = response.read1(1 << 16)
            except TimeoutError:
                raise FetchError(f"{self.noun} took longer than {self.deadline:g} s to fetch", "timed out") from None
            if not chunk:
                self._check(connection)
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_bytes:
                raise FetchError(f"the image at {self.noun} is larger than the {self.max_bytes} byte limit", "too large")
