import json
import os
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import clipkit
from clipkit.errors import CheckpointError, OfflineError
from clipkit.models import CHECKPOINT_FORMAT, load_model, read_checkpoint, save_checkpoint

from conftest import make_checkpoint


def test_named_model_is_deterministic_and_describes_itself():
    a = load_model("clipkit-tiny", device="cpu")
    b = load_model("clipkit-tiny", device="cpu")
    assert a.fingerprint == b.fingerprint
    assert (a.name, a.dim, a.image_size, a.context_length) == ("clipkit-tiny", 64, 32, 32)
    assert a.device == torch.device("cpu")
    assert callable(a.preprocess) and a.tokenizer(["a dog"]).shape == (1, 32)


def test_unknown_model_lists_what_exists():
    with pytest.raises(ValueError, match=r"unknown model 'ViT-B-33'.*ViT-B-32.*clipkit-tiny"):
        load_model("ViT-B-33")


def test_list_models_has_ours_and_open_clips():
    names = clipkit.list_models()
    assert names[0].startswith("clipkit-") and "ViT-B-32" in names and "RN50" in names


def test_local_state_dict_loads_exactly(tiny_ckpt):
    model = load_model("clipkit-tiny", pretrained=tiny_ckpt, device="cpu")
    saved = torch.load(tiny_ckpt, weights_only=True)
    for key, value in model.clip.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert model.pretrained == str(Path(tiny_ckpt).resolve())
    assert model.fingerprint != load_model("clipkit-tiny").fingerprint


def test_wrapped_and_ddp_prefixed_state_dicts(tmp_path, tiny_ckpt):
    state = torch.load(tiny_ckpt, weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    assert load_model("clipkit-tiny", pretrained=wrapped).fingerprint == \
        load_model("clipkit-tiny", pretrained=tiny_ckpt).fingerprint


def test_safetensors_file(tmp_path, tiny_ckpt):
    from safetensors.torch import save_file

    state = torch.load(tiny_ckpt, weights_only=True)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert load_model("clipkit-tiny", pretrained=path).fingerprint == \
        load_model("clipkit-tiny", pretrained=tiny_ckpt).fingerprint


def test_clipkit_checkpoint_round_trip(tmp_path, tiny_model):
    path = tmp_path / "own.pt"
    save_checkpoint(tiny_model, path, step=7)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["step"] == 7
    assert load_model("clipkit-tiny", pretrained=path).fingerprint == tiny_model.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model("clipkit-tiny", pretrained=str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read weights file .*: not a PyTorch or safetensors weights"):
        load_model("clipkit-tiny", pretrained=junk)


def test_weights_for_another_architecture_are_refused(tmp_path, tiny_model):
    """Weights of another architecture are a CheckpointError that says what does not fit (not an
    AssertionError from open_clip's position-embedding resizer), and, for a clipkit checkpoint, which
    model they were made for."""
    other = make_checkpoint(tmp_path / "rn.pt", name="clipkit-tiny-rn")
    with pytest.raises(CheckpointError, match=r"do not fit this model \((Missing|Unexpected) key"):
        load_model("clipkit-tiny", pretrained=other)
    own = tmp_path / "own.pt"
    save_checkpoint(tiny_model, own, step=1)
    for name in ("clipkit-tiny-rn", "ViT-B-32"):  # (ViT-B-32: open_clip's resizer asserted)
        with pytest.raises(CheckpointError, match="they were made for clipkit-tiny: pass --model clipkit-tiny"):
            load_model(name, pretrained=own)


def test_a_training_run_folder_gives_its_latest_checkpoint(tmp_path, tiny_model):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(load_model("clipkit-tiny"), run / "ckpt-0000002.pt", step=2)
    save_checkpoint(tiny_model, run / "ckpt-0000010.pt", step=10)
    loaded = load_model("clipkit-tiny", pretrained=run)
    assert loaded.fingerprint == tiny_model.fingerprint and loaded.pretrained == str((run / "ckpt-0000010.pt").resolve())
    alone = load_model(str(run))  # the run folder as the model: the model its latest checkpoint names
    assert (alone.name, alone.fingerprint, alone.pretrained) == ("clipkit-tiny", tiny_model.fingerprint, loaded.pretrained)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder; pass the weights file inside it"):
        load_model("clipkit-tiny", pretrained=tmp_path / "empty")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*posix.system"):
        read_checkpoint(path)


def test_unknown_tag_lists_known_tags():
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for ViT-B-32; known tags: .*laion2b_s34b_b79k"):
        load_model("ViT-B-32", pretrained="nope")


def test_uncached_tag_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.delenv("CLIPKIT_OFFLINE", raising=False)
    monkeypatch.setattr("clipkit.models.reachable", lambda host, **kw: False)
    monkeypatch.setattr("clipkit.models.cached_tag_file", lambda cfg, cache_dir: None)
    start = time.monotonic()
    with pytest.raises(OfflineError, match=r"not cached .* local file.*clipkit-demo"):
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert time.monotonic() - start < 5


def test_offline_env_var_never_probes_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("clipkit.models.reachable", lambda host, **kw: pytest.fail("probed the network"))
    monkeypatch.setattr("clipkit.models.cached_tag_file", lambda cfg, cache_dir: None)
    with pytest.raises(OfflineError):
        load_model("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_a_hub_mirror_is_probed_at_its_own_port_and_once_a_minute(monkeypatch):
    """HF_ENDPOINT naming a mirror at its own port (http://mirror:8080) was probed at port 443: an internal
    mirror that answered was taken for an unreachable hub, and models were read from the cache alone. And a
    model's load probed the hub up to three times, each a whole timeout where DNS hangs."""
    import socket

    from huggingface_hub import constants

    import clipkit._net as net

    monkeypatch.setattr(net, "_probed", {})
    proxies = [f"{scheme}_proxy" for scheme in ("https", "http", "all", "no")]
    for variable in ("HF_HUB_OFFLINE", "CLIPKIT_OFFLINE", *proxies, *(v.upper() for v in proxies)):
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as mirror:
        mirror.bind(("127.0.0.1", 0))
        mirror.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{mirror.getsockname()[1]}")
        assert net.hf_hub_address() == ("127.0.0.1", mirror.getsockname()[1]) and net.hub_reachable()
        with net.hub_offline_when_unreachable():
            assert not constants.HF_HUB_OFFLINE  # the mirror answers: huggingface_hub may ask it
        # behind a proxy (requests and httpx go through it): the proxy is what must answer
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{mirror.getsockname()[1]}")
        assert net.hf_hub_address() == ("127.0.0.1", mirror.getsockname()[1]) and net.hub_reachable()
        monkeypatch.setenv("NO_PROXY", "example.invalid")
        assert net.hf_hub_address() == ("hub.example.invalid", 443)
    monkeypatch.delenv("HTTPS_PROXY")
    assert net.url_address("http://example.org/x") == ("example.org", 80)
    assert net.url_address("https://example.org/x") == ("example.org", 443)
    probes = []
    monkeypatch.setattr(net, "_probe", lambda host, port, timeout: probes.append((host, port)) or False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    for _ in range(3):
        with net.hub_offline_when_unreachable():
            assert constants.HF_HUB_OFFLINE
    assert probes == [("hub.example.invalid", 443)]  # one probe stands for a minute
    monkeypatch.setattr(net, "PROBE_TTL_S", 0.0)
    assert not net.hub_reachable() and len(probes) == 2


@pytest.fixture
def fake_tags(monkeypatch):
    """Pretrained tags for clipkit-tiny in open_clip's registry, one by URL and one on the HF hub."""
    tags = {"viaurl": {"url": "https://example.invalid/weights/tiny-weights.pt", "hf_hub": "", "quick_gelu": False},
            "viahub": {"url": "", "hf_hub": "someorg/tiny-clip/"}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "clipkit-tiny", tags)
    return tags


def test_cached_url_tag_loads_from_cache(tmp_path, tiny_ckpt, fake_tags):
    (tmp_path / "tiny-weights.pt").write_bytes(Path(tiny_ckpt).read_bytes())
    model = load_model("clipkit-tiny", pretrained="viaurl", cache_dir=str(tmp_path))
    assert model.fingerprint == load_model("clipkit-tiny", pretrained=tiny_ckpt).fingerprint
    assert model.pretrained == "viaurl"


def test_cached_hf_hub_tag_loads_from_hub_cache(tmp_path, tiny_ckpt, fake_tags):
    snapshot = tmp_path / "models--someorg--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someorg--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--someorg--tiny-clip" / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(Path(tiny_ckpt).read_bytes())
    model = load_model("clipkit-tiny", pretrained="viahub", cache_dir=str(tmp_path))
    assert model.fingerprint == load_model("clipkit-tiny", pretrained=tiny_ckpt).fingerprint


def test_uncached_tag_downloads_when_reachable(monkeypatch, tmp_path, tiny_ckpt, fake_tags):
    monkeypatch.delenv("CLIPKIT_OFFLINE", raising=False)
    monkeypatch.setattr("clipkit.models.reachable", lambda host, **kw: host == "example.invalid")
    calls = []

    def fake_download(cfg, cache_dir=None):
        calls.append(cfg["url"])
        return str(tiny_ckpt)

    monkeypatch.setattr("open_clip.pretrained.download_pretrained", fake_download)
    model = load_model("clipkit-tiny", pretrained="viaurl", cache_dir=str(tmp_path))
    assert calls == [fake_tags["viaurl"]["url"]]
    assert model.fingerprint == load_model("clipkit-tiny", pretrained=tiny_ckpt).fingerprint


def test_bad_device():
    with pytest.raises(ValueError, match="unknown device"):
        load_model("clipkit-tiny", device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model("clipkit-tiny", device="cuda")


def test_channels_last_only_for_convolutional_towers_on_cuda_and_changes_nothing(monkeypatch):
    from clipkit.models import set_channels_last, wants_channels_last

    resnet = load_model("clipkit-tiny-rn", device="cpu")
    vit = load_model("clipkit-tiny", device="cpu")
    assert wants_channels_last(resnet.clip, "cuda") and not wants_channels_last(vit.clip, "cuda")
    assert not wants_channels_last(resnet.clip, "cpu") and not resnet.channels_last
    monkeypatch.setenv("CLIPKIT_CHANNELS_LAST", "0")
    assert not wants_channels_last(resnet.clip, "cuda")
    # the layout is only a layout: the same embeddings (checked on the CPU, where NHWC also runs)
    pixels = torch.rand(5, 3, resnet.image_size, resnet.image_size)
    before = resnet.encode_image(pixels)
    set_channels_last(resnet)
    assert resnet.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(resnet.encode_image(pixels), before, atol=1e-5, rtol=1e-4)


def test_siglip_family_checkpoint_fixes(tmp_path, monkeypatch):
    """logit_bias (scalar vs 1-d, absent from a non-SigLIP checkpoint) and a stale position_ids key load as
    open_clip's own load_checkpoint would load them."""
    import json

    import open_clip
    from open_clip import factory

    from clipkit.models import register_configs, load_state_into

    register_configs()
    config = json.loads(json.dumps(open_clip.get_model_config("clipkit-tiny")))
    config["init_logit_bias"] = -10.0
    monkeypatch.setitem(factory._MODEL_CONFIGS, "clipkit-tiny-bias", config)
    target = open_clip.create_model("clipkit-tiny-bias")
    plain = open_clip.create_model("clipkit-tiny").state_dict()
    load_state_into(target, dict(plain), "plain.pt")  # no logit_bias in the file: zero
    assert float(target.logit_bias) == 0.0
    with_bias = dict(plain, logit_bias=torch.tensor(-7.0).reshape(1, 1).squeeze(0))  # 1-d where the model has 0-d
    with_bias["text.transformer.embeddings.position_ids"] = torch.arange(4)
    if target.logit_bias.ndim == with_bias["logit_bias"].ndim:
        with_bias["logit_bias"] = with_bias["logit_bias"].reshape(-1, 1)
    load_state_into(target, with_bias, "biased.pt")
    assert float(target.logit_bias) == -7.0


def test_precision_and_channels_last_are_load_model_arguments(monkeypatch):
    import numpy as np

    import clipkit
    from clipkit.models import load_model

    monkeypatch.setenv("CLIPKIT_FP32", "1")
    assert load_model("clipkit-tiny", device="cpu").precision == "fp32"  # the environment is the default
    assert load_model("clipkit-tiny", device="cpu", precision="auto").precision == "auto"  # the argument wins
    with pytest.raises(ValueError, match="precision"):
        load_model("clipkit-tiny", device="cpu", precision="fp8")
    plain = load_model("clipkit-tiny-rn", device="cpu")
    nhwc = load_model("clipkit-tiny-rn", device="cpu", channels_last=True)
    assert nhwc.channels_last and not plain.channels_last
    images = [np.full((48, 48, 3), v, np.uint8) for v in (20, 140, 250)]
    np.testing.assert_allclose(clipkit.encode(images, model=nhwc), clipkit.encode(images, model=plain), atol=1e-5)


def _hub_repo(hub: Path, repo: str) -> Path:
    """The snapshot folder of `repo` in the cache layout huggingface_hub writes."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("2" * 40)
    snapshot = folder / "snapshots" / ("2" * 40)
    snapshot.mkdir(parents=True)
    return snapshot


def test_a_hub_tokenizer_and_hub_weights_come_from_the_cache_while_the_hub_is_unreachable(tmp_path):
    """49 open_clip architectures (SigLIP, SigLIP 2, CLIPA, MetaCLIP 2, NLLB-CLIP, ...) keep their tokenizer in
    a hub repository (text_cfg's hf_tokenizer_name). With the hub unreachable and no offline switch set,
    huggingface_hub retried every file for up to a minute before it read its cache (hf-hub: names too), with
    a warning a try; uncached, transformers' error came after those retries. Now the cache is read at once, and
    a tokenizer not there is a one-line error at once."""
    import json as json_module
    import subprocess
    import sys

    import tokenizers

    from clipkit.bundled import CONFIG_DIR

    hub = tmp_path / "hub"
    words = ["[PAD]", "[UNK]", "a", "red", "circle", "blue", "square", "two", "big"]
    fast = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: n for n, w in enumerate(words)}, unk_token="[UNK]"))
    fast.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer_dir = _hub_repo(hub, "someone/tiny-tokenizer")
    fast.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json_module.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    (tokenizer_dir / "config.json").write_text('{"architecture": "vit_tiny"}')  # (timm's, as its repos hold)
    weights = make_checkpoint(tmp_path / "tiny.pt", seed=7)
    state = torch.load(weights, weights_only=True)
    for repo, tokenizer in (("someone/tiny-siglip-like", "someone/tiny-tokenizer"),
                            ("someone/other-siglip-like", "someone/uncached-tokenizer")):
        model_cfg = json_module.loads((CONFIG_DIR / "clipkit-tiny.json").read_text())
        model_cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer
        snapshot = _hub_repo(hub, repo)
        torch.save(state.get("model", state), snapshot / "open_clip_pytorch_model.bin")
        (snapshot / "open_clip_config.json").write_text(json_module.dumps({"model_cfg": model_cfg,
                                                                           "preprocess_cfg": {}}))
    texts = ["a red circle", "two big blue square"]
    code = ("import json, sys, clipkit; m = clipkit.load_model(sys.argv[1], device='cpu'); "
            f"print(json.dumps(clipkit.encode({texts!r}, model=m).tolist()))")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_ENDPOINT": "http://127.0.0.1:9"}  # (a closed port)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CLIPKIT_OFFLINE"):
        env.pop(variable, None)
    run, uncached = [subprocess.Popen([sys.executable, "-c", code, f"hf-hub:{repo}"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env)
                     for repo in ("someone/tiny-siglip-like", "someone/other-siglip-like")]  # (side by side)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    assert "127.0.0.1:9" not in err and "Retrying" not in err  # no request, no retry
    clip = open_clip.create_model("clipkit-tiny", pretrained=None)
    clip.load_state_dict(state.get("model", state))
    tokens = open_clip.tokenizer.HFTokenizer(str(tokenizer_dir), context_length=32)(texts)
    assert tokens[0, :3].tolist() == [2, 3, 4]  # the cached vocabulary's ids ("a red circle")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(clip.eval().encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(json_module.loads(out.strip().splitlines()[-1]), expected, atol=1e-5)

    _, err = uncached.communicate(timeout=300)  # a tokenizer not cached: said at once
    assert uncached.returncode != 0 and "Retrying" not in err
    assert "someone/uncached-tokenizer, is not in the Hugging Face cache and the hub cannot be reached" in err


def test_open_clip_hf_hub_names_load_from_the_hub_cache(tmp_path):
    """`hf-hub:ORG/REPO` (open_clip's config and weights published on the hub) loads through open_clip from
    the cache layout huggingface_hub writes, offline; not cached and offline fails at once."""
    import json as json_module
    import subprocess
    import sys

    from clipkit.bundled import CONFIG_DIR

    weights = make_checkpoint(tmp_path / "tiny.pt", seed=7)
    repo = tmp_path / "hub" / "models--someone--tiny-open-clip"
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    state = torch.load(weights, weights_only=True)
    torch.save(state.get("model", state), snapshot / "open_clip_pytorch_model.bin")
    model_cfg = json_module.loads((CONFIG_DIR / "clipkit-tiny.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json_module.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    code = ("import json, clipkit; m = clipkit.load_model('hf-hub:someone/tiny-open-clip', device='cpu'); "
            "print(json.dumps([m.name, m.dim, clipkit.encode(['a red circle', 'a blue square'], model=m).tolist()]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    run, missing = [subprocess.Popen([sys.executable, "-c", source], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
                    for source in (code, code.replace("tiny-open-clip", "not-there"))]  # (side by side)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-2000:]
    name, dim, vectors = json_module.loads(out.strip().splitlines()[-1])
    reference = clipkit.load_model("clipkit-tiny", pretrained=str(weights), device="cpu")
    assert name == "hf-hub:someone/tiny-open-clip" and dim == 64
    np.testing.assert_allclose(vectors, clipkit.encode(["a red circle", "a blue square"], model=reference), atol=1e-5)
    _, err = missing.communicate(timeout=300)
    assert missing.returncode != 0 and "not in the Hugging Face cache" in err


def test_a_model_shared_by_threads_never_meets_a_flag_another_thread_set(tiny_model):
    """The ITM token helpers set a tower's `output_tokens` while they run: an embedding computed meanwhile in
    another thread (one model shared: an Index used by threads, `clipkit.search` by path) got the tower's
    (pooled, tokens) tuple and failed. Both now hold the model's flags lock."""
    import threading

    from clipkit.itm import encode_image_tokens

    pixels = torch.rand(8, 3, tiny_model.image_size, tiny_model.image_size)
    expected, errors = tiny_model.encode_image(pixels), []

    def tokens():
        for _ in range(200):
            encode_image_tokens(tiny_model.clip, pixels)

    def plain():
        try:
            for _ in range(200):
                torch.testing.assert_close(tiny_model.encode_image(pixels), expected)
        except Exception as exc:  # (an error in a thread: kept for the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=tokens), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and tiny_model.clip.visual.output_tokens is False


def _hub_file(cache: Path, repo: str, name: str, content: bytes) -> None:
    """A file of `repo` in a Hugging Face cache laid out as huggingface_hub writes it (blob, snapshot link)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text("abc123")
    blob = folder / "blobs" / f"{abs(hash((repo, name))):x}"
    blob.write_bytes(content)
    (folder / "snapshots" / "abc123").mkdir(parents=True, exist_ok=True)
    (folder / "snapshots" / "abc123" / name).symlink_to(blob)


def test_the_models_that_load_here_are_listed(tmp_path, tiny_ckpt, fake_tags, capsys):
    """`clipkit models`: the bundled models, open_clip's tags (cached ones: offline), the hub cache's checkpoints."""
    from clipkit.catalog import available_models
    from clipkit.cli import main

    hub = tmp_path / "hub"
    _hub_file(hub, "someorg/tiny-clip", "open_clip_pytorch_model.bin", Path(tiny_ckpt).read_bytes())  # tag viahub
    _hub_file(hub, "org/a-clip", "config.json", json.dumps({"model_type": "clip", "projection_dim": 512}).encode())
    _hub_file(hub, "org/a-clip", "model.safetensors", b"weights")
    _hub_file(hub, "org/oc", "open_clip_config.json", json.dumps({"model_cfg": {"embed_dim": 768}}).encode())
    _hub_file(hub, "org/oc", "open_clip_model.safetensors", b"weights")
    _hub_file(hub, "org/itm", "config.json", json.dumps({"model_type": "blip",
                                                          "architectures": ["BlipForImageTextRetrieval"]}).encode())
    _hub_file(hub, "org/itm", "model.safetensors", b"weights")
    _hub_file(hub, "org/only-config", "config.json", json.dumps({"model_type": "clip"}).encode())  # no weights
    _hub_file(hub, "org/bert", "config.json", json.dumps({"model_type": "bert"}).encode())  # not a dual encoder
    _hub_file(hub, "org/bert", "model.safetensors", b"weights")
    rows = {(row["model"], row["pretrained"]): row for row in available_models(cache_dir=str(hub))}
    assert rows[("clipkit-demo", None)]["weights"] == "bundled" and rows[("clipkit-demo", None)]["dim"] == 128
    assert rows[("clipkit-tiny", None)]["weights"] == "none"
    assert rows[("clipkit-tiny", "viahub")]["weights"] == "cached" and rows[("clipkit-tiny", "viaurl")]["weights"] \
        == "download"
    assert rows[("ViT-B-32", "laion2b_s34b_b79k")] == {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k",
                                                       "dim": 512, "weights": "download"}
    assert rows[("hf:org/a-clip", None)]["dim"] == 512 and rows[("hf-hub:org/oc", None)]["dim"] == 768
    assert not {("hf:org/only-config", None), ("hf:org/bert", None)} & set(rows)
    assert rows[("hf:org/itm", None)]["reranker"] and "reranker" not in rows[("hf:org/a-clip", None)]
    assert main(["models", "--offline", "--json"]) == 0  # (this machine's own cache: nothing downloaded)
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {"model": "clipkit-demo", "pretrained": None, "dim": 128, "weights": "bundled"} in listed
    assert all(row["weights"] in ("bundled", "cached") for row in listed)
    assert main(["models", "vit-b-32"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "PRETRAINED", "DIM", "WEIGHTS"] and len(table) > 5
    assert all("vit-b-32" in line.split()[0].lower() for line in table[1:])
    assert main(["models", "no-such-model"]) == 2
