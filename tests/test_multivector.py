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
    with pytest.raises(ValueError, match="exactly for now"):
        Index(8, vectors_per_item=3, index_type="IVF16,Flat")
    with pytest.raises(ValueError, match="positive integer"):
        Index(8, vectors_per_item=0)
    one = np.zeros((1, 3, 8), np.float32)
    one[0, :, 0] = 1
    one[0, 1] = 0
    with pytest.raises(ValueError, match="all-zero"):
        index.add(one)
