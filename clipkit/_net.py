"""Whether the network is there: a quick reachability probe, and the switches that force offline work."""

from __future__ import annotations

import os
import socket
import threading


def reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """True when a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    if not host:
        return False
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
