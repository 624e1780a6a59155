"""Fetching a query image by URL, only where the server allows it, and never from inside the network.

A URL is fetched only over http(s), and only when every address its host resolves to is public:
loopback, private, link-local (cloud metadata), multicast, reserved and unspecified addresses are
refused, for the URL and for every redirect it leads to. The body is capped in size and time.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request

USER_AGENT = "clipkit-serve (+https://github.com/clipkit)"


class FetchError(ValueError):
    """The URL is not allowed or could not be fetched (a 4xx for the client)."""


def check_public_url(url: str) -> None:
    """Raise FetchError unless `url` is http(s) to a host whose every address is public."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"image_url must be http or https, got {parts.scheme or 'no scheme'!r}")
    host = parts.hostname
    if not host:
        raise FetchError("image_url has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("image_url has an invalid port") from None
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"cannot resolve the host of image_url ({host}): {exc}") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        address = mapped or address
        if not address.is_global or address.is_multicast:
            raise FetchError(f"image_url points to a non-public address ({address}); refused")


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_public_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_image_bytes(url: str, max_bytes: int, timeout: float = 10.0) -> bytes:
    """The body at a public http(s) URL, at most `max_bytes` long."""
    check_public_url(url)
    opener = urllib.request.build_opener(_CheckedRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with opener.open(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except FetchError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FetchError(f"cannot fetch image_url: {exc}") from None
    if len(data) > max_bytes:
        raise FetchError(f"the image at image_url is larger than the {max_bytes} byte limit")
    return data
