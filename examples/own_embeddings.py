"""Embeddings made elsewhere, offline: index vectors with ids and metadata, search them with an ANN structure
tuned on queries like yours, hand them to the field's tools in clip-retrieval's layout, and read that back.

    python examples/own_embeddings.py [--out DIR] [--n 100000]

The vectors here are random stand-ins for what your pipeline writes (any model, any width). The CLI does
the same with `clipkit index EMB_DIR --index-type auto --tune-queries queries.npy` and `clipkit export`.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import clipkit


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the index and the export")
    parser.add_argument("--n", type=int, default=100_000, help="how many vectors")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="clipkit-embeddings-"))

    rng = np.random.default_rng(0)
    topics = unit(rng.standard_normal((64, 256)))  # clustered, as real embeddings are
    vectors = unit(topics[rng.integers(0, 64, args.n)] + 0.6 * rng.standard_normal((args.n, 256)) / 16)
    ids = [f"doc-{n}" for n in range(args.n)]
    metadata = [{"url": f"https://example.com/{n}.jpg", "caption": f"item {n}"} for n in range(args.n)]

    index = clipkit.Index(256, index_type="auto")  # exact while small, a tuned ANN structure past that
    for start in range(0, args.n, 5_000):  # in chunks, as a pipeline writes them
        index.add(vectors[start:start + 5_000], ids=ids[start:start + 5_000], metadata=metadata[start:start + 5_000])
    queries = unit(vectors[rng.integers(0, args.n, 500)] + 0.5 * rng.standard_normal((500, 256)) / 16)
    index.build(sample_queries=queries)  # tuned for recall@10 >= 0.95 on queries like these
    index.save(out / "docs.clipkit")
    tuning = index.tuning
    print(f"{len(index)} vectors, {index.structure}" + (f", estimated recall@10 {tuning['estimated_recall']:.3f} on "
                                                        "held-out queries like yours" if tuning else
                                                        " (exact search: fast enough at this size)"))

    hits = clipkit.search(queries[0], index, k=3)  # a vector query
    print("top 3:", [(hit.id, round(hit.score, 3), hit.metadata["url"]) for hit in hits])
    exact = np.argsort(-(vectors @ queries[0]))[:3]
    print("exact:", [ids[n] for n in exact])

    export = out / "export"  # img_emb/*.npy (float16) + metadata/*.parquet: autofaiss, clip-retrieval read it
    done = index.export(export, part_size=8_000)
    print(f"exported {done['rows']} rows in {done['parts']} parts to {export}")

    back = clipkit.Index(256)
    back.sync_embeddings(export)  # = `clipkit index EXPORT`: the same ids, the vectors within float16 rounding
    same = sorted(back.ids()) == sorted(ids)
    error = np.abs(back.embeddings(ids[:100]) - vectors[:100]).max()
    print(f"read back: same ids {same}, largest difference {error:.1e}")


if __name__ == "__main__":
    main()
