"""An index out, in clip-retrieval's layout: what `clipkit index EMB_DIR` reads (`clipkit.index.ingest`), and
what autofaiss, clip-retrieval's back end and embedding_reader read.

    OUT/img_emb/img_emb_{i}.npy           float16 image embeddings, `part_size` rows a part
    OUT/text_emb/text_emb_{i}.npy         the first caption's embedding of each row (zeros without one), when
                                          the index holds captions
    OUT/metadata/metadata_{i}.parquet     id, image_path, url, caption (where known)

`id` carries the item's id (integers stay integers when every id is one), so that reading the folder back
gives the same ids. Each file is written under a temporary name and renamed into place; memory is bounded
by one part.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clipkit._io import atomic_write_with
from clipkit.index.captions import first_captions


def export_embeddings(index, out: str | os.PathLike, *, part_size: int = 100_000,
                      progress: bool | None = None) -> dict:
    """Write `index` into folder `out` (which must not hold an export already); {'parts', 'rows', 'captions'}."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("writing metadata_*.parquet needs pyarrow: pip install 'clipkit[parquet]'") from None
    if index.vectors_per_item > 1:
        raise ValueError(f"this index keeps {index.vectors_per_item} vectors an item; clip-retrieval's layout holds "
                         "one an image, so it cannot be exported to it")
    out = Path(out)
    if any(out.glob("img_emb/*.npy")):
        raise ValueError(f"{out} already holds an export (img_emb/); choose a new folder")
    for sub in ("img_emb", "metadata") + (("text_emb",) if index.captions is not None else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ids = index.ids()
    whole_numbers = all(isinstance(i, int) for i in ids)
    captions = 0
    with tqdm(total=len(ids), disable=None if progress is None else not progress, unit="vec", desc="exporting") as bar:
        for part, start in enumerate(range(0, len(ids), part_size)):
            chunk = ids[start:start + part_size]
            records = index.get(chunk)
            first = first_captions(index.captions, chunk)  # item id -> its first caption's record
            _save_npy(out / "img_emb" / f"img_emb_{part}.npy", index.embeddings(chunk).astype(np.float16))
            if index.captions is not None:
                _save_npy(out / "text_emb" / f"text_emb_{part}.npy", _caption_vectors(index, chunk, first))
            table = pa.table({
                "id": chunk if whole_numbers else [str(i) for i in chunk],
                "image_path": [r.get("path") or (r["id"] if isinstance(r["id"], str) else None) for r in records],
                "url": [r.get("url") for r in records],
                "caption": [r.get("caption") or first.get(r["id"], {}).get("caption") for r in records]})
            atomic_write_with(out / "metadata" / f"metadata_{part}.parquet", lambda tmp: pq.write_table(table, tmp))
            captions += len(first)
            bar.update(len(chunk))
    return {"parts": (len(ids) + part_size - 1) // part_size, "rows": len(ids), "captions": captions}


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
    atomic_write_with(path, write)


def _caption_vectors(index, ids: list, first: dict) -> np.ndarray:
    """The first caption's embedding of each item, zeros where it has none (float16)."""
    vectors = np.zeros((len(ids), index.dim), np.float16)
    rows = [n for n, i in enumerate(ids) if i in first]
    if rows:
        vectors[rows] = index.captions.embeddings([first[ids[n]]["id"] for n in rows]).astype(np.float16)
    return vectors
