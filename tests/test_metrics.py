import numpy as np
import pytest

from clipkit.metrics import recall_at_k, recall_from_embeddings


def test_hand_built_matrix_with_several_captions_per_image():
    # captions 0,1 -> image 0; caption 2 -> image 1; captions 3,4 -> image 2
    sim = np.array([[0.9, 0.1, 0.2],
                    [0.3, 0.8, 0.1],   # caption 1: its image 0 ranks 2nd
                    [0.5, 0.6, 0.4],   # caption 2: image 1 ranks 1st
                    [0.7, 0.1, 0.2],   # caption 3: image 2 ranks 2nd
                    [0.1, 0.3, 0.2]])  # caption 4: image 2 ranks 2nd
    r = recall_at_k(sim, [0, 0, 1, 2, 2], ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(2 / 5) and r["t2i_R@2"] == 1.0 and r["t2i_R@3"] == 1.0
    assert r["t2i_mean_rank"] == pytest.approx((1 + 2 + 1 + 2 + 2) / 5) and r["t2i_median_rank"] == 2
    # image 0: column [.9,.3,.5,.7,.1], own captions 0,1 -> best .9 ranks 1st
    # image 1: column [.1,.8,.6,.1,.3], own caption 2 (.6) behind caption 1 (.8) -> rank 2
    # image 2: column [.2,.1,.4,.2,.2], own 3,4 best .2; caption 2 (.4) ahead, caption 0 (.2) ties -> rank 3
    assert r["i2t_R@1"] == pytest.approx(1 / 3) and r["i2t_R@2"] == pytest.approx(2 / 3) and r["i2t_R@3"] == 1.0
    assert r["i2t_mean_rank"] == pytest.approx(2.0) and r["i2t_median_rank"] == 2


def test_ties_count_against_the_query():
    r = recall_at_k(np.ones((4, 4)), [0, 1, 2, 3], ks=(1, 4))
    assert r["t2i_R@1"] == 0.0 and r["t2i_R@4"] == 1.0 and r["t2i_mean_rank"] == 4.0
    assert r["i2t_R@1"] == 0.0 and r["i2t_mean_rank"] == 4.0


def test_one_image():
    r = recall_at_k(np.array([[0.3], [0.1]]), [0, 0], ks=(1,))
    assert r["t2i_R@1"] == 1.0 and r["i2t_R@1"] == 1.0 and r["i2t_mean_rank"] == 1.0


def test_image_without_captions_never_hits():
    r = recall_at_k(np.array([[0.9, 0.1]]), [0], ks=(1,))
    assert r["i2t_R@1"] == 0.5


def reference(sim: np.ndarray, t2i, ks):
    """Dense argsort-based reference with the same pessimistic tie rule (ties are unlikely in random data)."""
    t2i = np.asarray(t2i)
    order = np.argsort(-sim, axis=1)
    t_ranks = np.array([np.where(order[t] == t2i[t])[0][0] + 1 for t in range(len(sim))])
    order_i = np.argsort(-sim.T, axis=1)
    i_ranks = np.array([min(np.where(np.isin(order_i[i], np.where(t2i == i)[0]))[0]) + 1 for i in range(sim.shape[1])])
    return {**{f"t2i_R@{k}": (t_ranks <= k).mean() for k in ks}, **{f"i2t_R@{k}": (i_ranks <= k).mean() for k in ks},
            "t2i_mean_rank": t_ranks.mean(), "i2t_mean_rank": i_ranks.mean()}


def test_blockwise_equals_dense_reference(tmp_path):
    rng = np.random.default_rng(0)
    texts, images = rng.standard_normal((1500, 32)).astype(np.float32), rng.standard_normal((300, 32)).astype(np.float32)
    mapping = np.repeat(np.arange(300), 5)
    rng.shuffle(mapping)
    sim = texts @ images.T
    expected = reference(sim, mapping, (1, 5, 10))
    memmap = np.memmap(tmp_path / "sim.f32", dtype=np.float32, mode="w+", shape=sim.shape)
    memmap[:] = sim
    for got in (recall_at_k(sim, mapping, block=64), recall_at_k(memmap, mapping, block=333),
                recall_from_embeddings(texts, images, mapping, block=7)):
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("args, message", [
    ((np.ones((2, 2)), [0]), "one entry per caption"),
    ((np.ones((2, 2)), [0, 2]), "outside"),
    ((np.ones((2, 2)), [0.5, 1.0]), "integer"),
    ((np.ones(3), [0, 0, 0]), "2-D"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(*args)
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(np.ones((1, 1)), [0], ks=(0,))
