"""A search result, on its own: what the library, the server and a client of the server (`clipkit.client`)
return, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Hit:
    """One search result: the item's id, its similarity score, its file path (if any) and metadata."""

    id: Any
    score: float
    path: str | None = None
    metadata: dict = field(default_factory=dict)
    key: int | None = field(default=None, repr=False, compare=False)  # the index's integer key for the item

    def to_dict(self) -> dict:
        return {"id": self.id, "score": self.score, "path": self.path, "metadata": self.metadata}
