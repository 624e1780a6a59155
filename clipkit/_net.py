"""Whether the network is there: a quick reachability probe, and the switches that force offline work."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from typing import Iterator
from urllib.parse import urlparse

from clipkit.errors import OfflineError


PROBE_TTL_S = 60.0  # how long one probe's answer stands: a model load asks up to three times
_probed: dict[tuple[str, int], tuple[float, bool]] = {}


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds (DNS included). The answer is
    kept for PROBE_TTL_S seconds: where DNS hangs, each probe costs its whole timeout."""
    if not host:
        return False
    when, ok = _probed.get((host, port), (float("-inf"), False))
    if time.monotonic() - when > PROBE_TTL_S:
        ok = _probe(host, port, timeout)
        _probed[(host, port)] = (time.monotonic(), ok)
    return ok


def _probe(host: str, port: int, timeout: float) -> bool:
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)  # getaddrinfo has no timeout of its own
    return result["ok"]


def offline_forced() -> bool:
    """CLIPKIT_OFFLINE or HF_HUB_OFFLINE is on: never reach for the network."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CLIPKIT_OFFLINE", "HF_HUB_OFFLINE"))


def proxy_url(url: str) -> str | None:
    """The proxy a client of `url` goes through, as requests and httpx choose it: $HTTPS_PROXY / $HTTP_PROXY
    by the URL's scheme, else $ALL_PROXY, unless $NO_PROXY names the host; or None."""
    parts = urlparse(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme or "https") or proxies.get("all")
    if not proxy or not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def url_address(url: str) -> tuple[str, int]:
    """(host, port) a client of `url` connects to: its proxy's (`proxy_url`), else the URL's own."""
    return _address(urlparse(proxy_url(url) or url))


def _address(parts) -> tuple[str, int]:
    """(host, port) of parsed URL parts: their port, else their scheme's (http 80, otherwise 443)."""
    try:
        port = parts.port
    except ValueError:  # a port that is no number
        port = None
    return parts.hostname or "", port or (80 if parts.scheme == "http" else 443)


def hf_hub_address() -> tuple[str, int]:
    """The Hugging Face hub's (host, port): $HF_ENDPOINT's (a mirror, e.g. http://mirror:8080), else
    huggingface.co's."""
    return url_address(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


def hub_reachable() -> bool:
    """Offline work is not forced and the Hugging Face hub (or $HF_ENDPOINT's mirror) answers."""
    return not offline_forced() and reachable(*hf_hub_address())


def hub_cached(repo: str, filename: str, cache_dir: str | None = None) -> bool:
    """Whether the hub repository `repo` has `filename` in the local Hugging Face cache (or `cache_dir`)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    return isinstance(found, str) and os.path.isfile(found)


def require_hub(repo: str, alternative: str = "", what: str = "") -> None:
    """Refuse at once, with what to do, to reach for `repo` (`what` it holds) on the Hugging Face hub when it
    cannot be reached."""
    if not hub_reachable():
        host, _ = hf_hub_address()
        named = f"{what}, {repo}," if what else repo
        raise OfflineError(f"{named} is not in the Hugging Face cache and the hub cannot be reached "
                           f"({'offline mode is on' if offline_forced() else host + ' is unreachable'}): download it "
                           f"on a machine online (`hf download {repo}`) and copy the cache "
                           f"(~/.cache/huggingface/hub){alternative}")


@contextlib.contextmanager
def hub_offline_when_unreachable() -> Iterator[None]:
    """While the Hugging Face hub cannot be reached (or offline work is forced), huggingface_hub and
    transformers read their cache alone for the duration: unreachable, they retried each file's request for
    up to a minute before reading the cache. (Process-wide: huggingface_hub's offline switch is one flag.)"""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    if not before and not hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
