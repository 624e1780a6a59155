"""Items of several vectors (BLIP-2's query tokens): an item scores the best of its vectors."""

from __future__ import annotations

import numpy as np
import pytest

from clipkit.index import Index


def items(n: int, m: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, m, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=2, keepdims=True)


def numpy_max(base: np.ndarray, ids: list, queries: np.ndarray, k: int) -> tuple[np.ndarray, list]:
    scores = np.einsum("qd,nmd->qnm", queries, base).max(axis=2)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), [[ids[i] for i in row] for row in order]


def test_exact_search_over_items_of_several_vectors_equals_numpy(tmp_path):
    base, queries = items(700, 4, 16, 0), items(30, 1, 16, 1)[:, 0]
    index = Index.from_embeddings(base, ids=[f"img{i}" for i in range(700)])
    assert index.vectors_per_item == 4 and index.dim == 16
    scores, ids = index.search(queries, 10)
    expected_scores, expected_ids = numpy_max(base, [f"img{i}" for i in range(700)], queries, 10)
    assert ids.tolist() == expected_ids
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    np.testing.assert_allclose(index.embeddings(["img3"]), base[3:4], atol=1e-6)
    assert index.embeddings().shape == (700, 4, 16)


def test_items_of_several_vectors_live_through_save_load_add_and_remove(tmp_path):
    base, queries = items(400, 3, 8, 2), items(20, 1, 8, 3)[:, 0]
    index = Index(8, vectors_per_item=3, index_type="auto")
    index.add(base[:300], ids=list(range(300)))
    index.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix")
    reader.refresh_interval = 0
    index.add(base[300:] * 7.0, ids=list(range(300, 400)))  # each vector normalised on its own
    index.remove(list(range(0, 100)))
    alive = list(range(100, 400))
    expected = numpy_max(base[100:], alive, queries, 5)[1]
    for one in (index, reader, Index.load(tmp_path / "ix")):
        assert one.vectors_per_item == 3 and len(one) == 300
        assert one.search(queries, 5)[1].tolist() == expected


def test_items_of_several_vectors_refuse_other_shapes_and_structures():
    index = Index(8, vectors_per_item=3)
    with pytest.raises(ValueError, match=r"\(N, 3, 8\)"):
        index.add(items(5, 1, 8, 0)[:, 0])
    with pytest.raises(ValueError, match="positive integer"):
        Index(8, vectors_per_item=0)
    one = np.zeros((1, 3, 8), np.float32)
    one[0, :, 0] = 1
    one[0, 1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        index.add(one)


def clustered_items(n: int, m: int, dim: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = centers[rng.integers(0, len(centers), (n, m))] + 0.2 * rng.standard_normal((n, m, dim))
    return (x / np.linalg.norm(x, axis=2, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("index_type", ["IVF32,Flat", "IVF32,PQ8x4fs,RFlat"])
def test_ann_over_items_of_several_vectors_keeps_recall_and_lives_on(tmp_path, index_type):
    """Every vector of an item goes into the structure (under the item's key); the shortlist's items are
    re-ranked by their best vector, so scores are exact and recall is tuned at the item level."""
    dim, m = 16, 4
    centers = np.random.default_rng(9).standard_normal((64, dim))
    base = clustered_items(4000, m, dim, 0, centers)
    queries = clustered_items(200, 1, dim, 1, centers)[:, 0]
    index = Index(dim, vectors_per_item=m, index_type=index_type, precision="float32")
    index.add(base, ids=list(range(4000)))
    index.build(sample_queries=clustered_items(600, 1, dim, 2, centers)[:, 0])
    assert index.tuning["estimated_recall"] >= 0.95
    expected_scores, expected = numpy_max(base, list(range(4000)), queries, 10)
    scores, ids = index.search(queries, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), expected)]) >= 0.93
    exact = np.einsum("qd,nmd->qnm", queries, base).max(axis=2)
    found = np.array([[exact[q, i] if i is not None else -np.inf for i in row] for q, row in enumerate(ids)])
    np.testing.assert_allclose(scores, found, atol=1e-5)  # every score is the item's best vector, exactly
    index.save(tmp_path / "ix")
    more = clustered_items(100, m, dim, 3, centers)
    index.add(more, ids=list(range(4000, 4100)))
    index.remove(list(range(1000)))
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 3100 and loaded._structure.per_item == m
    alive = np.concatenate([base[1000:], more])
    _, expected = numpy_max(alive, list(range(1000, 4100)), queries, 10)
    for one in (index, loaded):
        ids = one.search(queries, 10)[1].tolist()
        assert not {i for row in ids for i in row} & set(range(1000))
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)]) >= 0.9
    found = loaded.search(more[:20, 2], 10)[1].tolist()  # an added item by one of its own vectors
    assert np.mean([4000 + n in row for n, row in enumerate(found)]) >= 0.9
