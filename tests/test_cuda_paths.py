"""The CUDA paths' decisions, checked on the CPU: which GPU each process uses, which half precision, when
the GPU FAISS copy is used, what resumes across devices, and chunked re-ranking. No GPU needed."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest
import torch

from clipkit import models
from clipkit.index import Index
from clipkit.index import ann


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")


def test_each_process_gets_its_own_gpu(fake_cuda):
    assert models.resolve_device(None) == torch.device("cuda", 1)
    assert models.resolve_device("cuda") == torch.device("cuda", 1)  # "cuda" without index: this process's GPU
    assert models.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert models.resolve_device("cpu") == torch.device("cpu")


def test_training_sets_the_device_before_the_process_group_and_binds_it(fake_cuda, monkeypatch):
    from clipkit import train

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(train.dist, "is_initialized", lambda: bool(calls and calls[-1][0] == "init"))
    monkeypatch.setattr(train.dist, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init", backend, kwargs.get("device_id"))))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for requested in ("cuda", None):
        calls.clear()
        rank, world, device = train._distributed_setup(train.TrainConfig(data="synthetic:8", out="x",
                                                                          device=requested))
        assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
        assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", torch.device("cuda", 1))]
    train._OWNED_GROUP.clear()


def test_half_precision_is_bf16_only_where_native(monkeypatch):
    seen = {}

    def supported(including_emulation=True):
        seen["emulation"] = including_emulation
        return including_emulation  # a V100/T4: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert models.cuda_half_dtype() == torch.float16 and seen["emulation"] is False


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("off", False),
                                             ("", None), ("maybe", None)])
def test_on_off_environment_flags(monkeypatch, value, expected):
    monkeypatch.setenv("CLIPKIT_FP32", value)
    assert models.env_flag("CLIPKIT_FP32", default=None) is expected  # CLIPKIT_FP32=0 no longer means "on"


def test_sampler_state_from_another_device_kind_is_not_fatal(caplog):
    from clipkit.train import _restore_generator

    generator = torch.Generator().manual_seed(0)
    _restore_generator(generator, [torch.zeros(16, dtype=torch.uint8)], 0)  # a CUDA generator's state size
    assert "another device kind" in caplog.text
    saved = torch.Generator().manual_seed(5).get_state()
    _restore_generator(generator, [saved], 0)
    assert torch.equal(generator.get_state(), saved)


def test_loader_pins_memory_only_when_asked(tmp_path):
    from clipkit.data.loader import make_loader
    from clipkit.data.synthetic import write_synthetic

    write_synthetic(tmp_path, 8, layout="shards", maxcount=8, workers=1, progress=False)
    model = models.load_model("clipkit-tiny", device="cpu")
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    assert make_loader(urls, model.preprocess, model.tokenizer, 4).pin_memory is False
    assert make_loader(urls, model.preprocess, model.tokenizer, 4, pin_memory=True).pin_memory is True


def test_chunked_rerank_equals_one_pass():
    from clipkit.evaluate import _rerank_rows

    similarity = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    calls = []

    def score(rows, cols):
        calls.append(len(rows))
        return (np.sin(rows * 7.0 + cols) * 3).astype(np.float32)

    whole = _rerank_rows(similarity, 16, score, 0.5, chunk=10**6)
    chunked = _rerank_rows(similarity, 16, score, 0.5, chunk=37)
    np.testing.assert_array_equal(whole, chunked)
    assert max(calls[1:]) <= 37 and sum(calls[1:]) == 50 * 16


class _FakeGpuIndex:
    """Stands in for a FAISS GPU index: a CPU clone that counts searches and checks it is used by one
    thread at a time."""

    def __init__(self, index):
        self.index, self.searches, self.busy = faiss.clone_index(index), 0, False

    def search(self, queries, k):
        assert k <= ann.GPU_MAX_K and not self.busy, "GPU search past its k limit or from two threads at once"
        self.busy = True
        try:
            self.searches += 1
            return self.index.search(queries, k)
        finally:
            self.busy = False

    def __getattr__(self, name):
        return getattr(self.index, name)


@pytest.mark.parametrize("index_type", ["flat", "IVF8,Flat"])
def test_gpu_copy_serves_searches_up_to_its_k_limit_one_thread_at_a_time(monkeypatch, index_type):
    clones = []

    def to_gpu(resources, device, index):
        clones.append(_FakeGpuIndex(index))
        return clones[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)  # (faiss-cpu has neither)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(ann, "GPU_MAX_K", 50)
    x = np.random.default_rng(0).standard_normal((600, 16)).astype(np.float32)
    index = Index.from_embeddings(x, ids=[f"i{n}" for n in range(600)], index_type=index_type, target_recall=1.0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.argsort(-(unit[:5] @ unit.T), axis=1)[:, :10]  # target_recall 1.0: IVF finds the exact ones
    made = len(clones)  # the tuner's searches ran on GPU copies too
    _, ids = index.search(x[:5], 10)
    assert len(clones) == made + 1 and clones[-1].searches == 1  # answered by a GPU copy, keys mapped to ids
    assert [[f"i{k}" for k in row] for row in expected.tolist()] == ids.tolist()
    scores, ids = index.search(x[:5], 60)  # past the GPU's k limit: the CPU index answers
    assert clones[-1].searches == 1 and ids.shape == (5, 60)
    threads = [threading.Thread(target=lambda: [index.search(x[:3], 5) for _ in range(20)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert clones[-1].searches == 81
    index.add(x[:2] * -1, ids=["new0", "new1"])  # a change: the next search makes a fresh copy
    assert index.search(-x[0], 1)[1][0, 0] == "new0" and len(clones) == made + 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs where a GPU exists: CUDA encoders against the CPU")
def test_cuda_encoders_match_the_cpu():
    import clipkit

    texts = ["a red circle left of a blue square", "a small green star"]
    images = [np.full((64, 64, 3), value, np.uint8) for value in (30, 200)]
    cpu, gpu = models.load_model("clipkit-demo", device="cpu"), models.load_model("clipkit-demo", device="cuda")
    for inputs in (texts, images):  # autocast on the GPU: half precision, so a loose tolerance
        np.testing.assert_allclose(clipkit.encode(inputs, model=gpu), clipkit.encode(inputs, model=cpu), atol=2e-2)


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="runs where FAISS sees a GPU: GPU search against the CPU")
@pytest.mark.parametrize("index_type", ["flat", "IVF16,Flat"])
def test_faiss_gpu_search_matches_the_cpu(index_type):
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    index = Index.from_embeddings(x, index_type=index_type, target_recall=1.0)
    on_gpu = index.search(x[:50], 10)
    assert index._structure._gpu  # a GPU copy answered
    unit = index.embeddings()
    on_cpu = np.sort(unit[:50] @ unit.T, axis=1)[:, ::-1][:, :10]
    assert np.mean(on_gpu[1] == np.argsort(-(unit[:50] @ unit.T), axis=1)[:, :10]) > 0.99
    np.testing.assert_allclose(on_gpu[0], on_cpu, atol=1e-4)
    assert index.search(x[:2], 3000)[1].shape == (2, 3000)  # past the GPU's k limit: on the CPU
    if index_type != "flat":  # a search for more than 10 probes as tuned for 100 on the GPU copy too
        index._structure.set_params({"nprobe": 1, "nprobe@50": 16})
        np.testing.assert_array_equal(index.search(x[:50], 50)[1],
                                      np.argsort(-(unit[:50] @ unit.T), axis=1)[:, :50])
        assert index._structure._gpu  # (answered by the GPU copy, which searches for 10 as before after it)
        assert np.mean(index.search(x[:50], 10)[1] == np.argsort(-(unit[:50] @ unit.T), axis=1)[:, :10]) < 1
