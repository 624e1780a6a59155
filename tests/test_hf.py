"""Hugging Face transformers checkpoints as clipkit models, against transformers' own outputs. Every model and
tokenizer here is tiny, random and written by the test: no hub."""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

transformers = pytest.importorskip("transformers")

import clipkit  # noqa: E402
from clipkit.errors import ModelMismatchError  # noqa: E402
from conftest import draw_shape  # noqa: E402

TEXTS = ["a red circle", "a small blue square left of a green triangle", "one", "an orange cross"]
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=64)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8)


def clip_dir(root: Path) -> Path:
    """A tiny random CLIPModel with a character-level CLIP BPE tokenizer and CLIP's image processor."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[])
    config = transformers.CLIPConfig(text_config=dict(TINY_TEXT, vocab_size=len(vocab), bos_token_id=0, eos_token_id=1,
                                                      pad_token_id=1),
                                     vision_config=TINY_VISION, projection_dim=24)
    torch.manual_seed(0)
    path = root / "tiny-clip"
    transformers.CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def siglip_dir(root: Path) -> Path:
    """A tiny random SiglipModel with a SentencePiece tokenizer trained here and SigLIP's image processor."""
    import sentencepiece as spm

    path = root / "tiny-siglip"
    path.mkdir()
    sentences = TEXTS + ["red green blue yellow circle square triangle cross large small left right of"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(path / "spiece"),
                                   vocab_size=40, hard_vocab_limit=False, model_type="unigram", eos_id=1, unk_id=2,
                                   pad_id=-1, bos_id=-1, minloglevel=2)
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=16)
    config = transformers.SiglipConfig(text_config=dict(TINY_TEXT, vocab_size=tokenizer.vocab_size,
                                                        max_position_embeddings=16),
                                       vision_config=TINY_VISION)
    torch.manual_seed(0)
    transformers.SiglipModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def siglip2_dir(root: Path) -> Path:
    """A tiny random Siglip2Model (NaFlex: patches at the image's own aspect ratio) with a character-level
    SigLIP 2 (Gemma) tokenizer and SigLIP 2's image processor."""
    path = root / "tiny-siglip2"
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    vocab.update((c, n) for n, c in enumerate(string.ascii_lowercase, len(vocab)))
    tokenizer = transformers.Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=16)
    config = transformers.Siglip2Config(
        text_config=dict(TINY_TEXT, vocab_size=tokenizer.vocab_size, max_position_embeddings=16),
        vision_config={k: v for k, v in TINY_VISION.items() if k != "image_size"} | {"num_patches": 16})
    torch.manual_seed(0)
    transformers.Siglip2Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {"clip": clip_dir(root), "siglip": siglip_dir(root), "siglip2": siglip2_dir(root)}


def images() -> list:
    return [draw_shape(c, s, size=(48, 40), seed=n) for n, (c, s) in
            enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")])]


def reference(path: Path, texts: list[str], pictures: list) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own features, unit-normalised: the processor's documented use for each model."""
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    padding = "max_length" if model.config.model_type in ("siglip", "siglip2") else True
    with torch.no_grad():
        encoded = tokenizer(texts, padding=padding, truncation=True, return_tensors="pt")
        text = model.get_text_features(**encoded).pooler_output
        image = model.get_image_features(**processor(images=pictures, return_tensors="pt")).pooler_output
    return F.normalize(text, dim=-1).numpy(), F.normalize(image, dim=-1).numpy()


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_encode_equals_transformers(checkpoints, kind):
    path = checkpoints[kind]
    model = clipkit.load_model(str(path), device="cpu")
    assert model.name == str(path.resolve()) and model.dim == (24 if kind == "clip" else 32)
    expected_text, expected_image = reference(path, TEXTS, images())
    np.testing.assert_allclose(clipkit.encode(TEXTS, model=model), expected_text, atol=1e-4)
    np.testing.assert_allclose(clipkit.encode(images(), model=model), expected_image, atol=1e-4)
    # one text at a time (other padding) gives the same embeddings
    np.testing.assert_allclose(np.concatenate([clipkit.encode([t], model=model) for t in TEXTS]), expected_text,
                               atol=1e-4)


def test_index_search_and_the_recorded_model(checkpoints, image_folder, tmp_path):
    model = clipkit.load_model(str(checkpoints["clip"]), device="cpu")
    index = clipkit.Index.from_folder(image_folder, model)
    index.save(tmp_path / "ix")
    loaded = clipkit.Index.load(tmp_path / "ix")
    hits = clipkit.search("a red circle", loaded, k=3)  # the index loads its recorded transformers model
    vector = clipkit.encode(["a red circle"], model=model)[0]
    scores = index.embeddings() @ vector
    assert [h.id for h in hits] == [index.ids()[i] for i in np.argsort(-scores)[:3]]
    other = clipkit.load_model(str(checkpoints["siglip"]), device="cpu")
    with pytest.raises(ModelMismatchError):
        clipkit.search("a red circle", loaded, k=3, model=other)


def test_hub_names_use_the_cache_and_fail_fast_offline(checkpoints, tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def load(*names: str) -> dict:
        """name -> [model name, text embeddings], or the error loading it gave (two fresh processes, not four)."""
        code = ("import json, sys, clipkit\nout = {}\nfor name in sys.argv[1:]:\n    try:\n"
                "        m = clipkit.load_model(name, device='cpu')\n"
                f"        out[name] = [m.name, clipkit.encode({TEXTS!r}, model=m).tolist()]\n"
                "    except Exception as exc:\n        out[name] = f'{type(exc).__name__}: {exc}'\n"
                "print(json.dumps(out))")
        done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    before = load("hf:someone/tiny-clip", "someone/not-cached")
    assert "not in the Hugging Face cache" in before["hf:someone/tiny-clip"]
    assert "is named hf:someone/not-cached" in before["someone/not-cached"]
    with pytest.raises(ValueError, match="hf:ORG/REPO"):
        clipkit.load_model("hf:a/b/c", device="cpu")
    # the cache layout huggingface_hub writes: models--ORG--REPO/{refs/main, snapshots/REV/FILES}
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(checkpoints["clip"], repo / "snapshots" / ("0" * 40))
    found = load("hf:someone/tiny-clip", "someone/tiny-clip")  # the second as users type it
    name, vectors = found["hf:someone/tiny-clip"]
    assert name == "hf:someone/tiny-clip"
    np.testing.assert_allclose(vectors, reference(checkpoints["clip"], TEXTS, images())[0], atol=1e-4)
    assert found["someone/tiny-clip"] == [name, vectors]


def test_not_a_dual_encoder(tmp_path):
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a dual encoder|cannot load"):
        clipkit.load_model(str(tmp_path / "bert"), device="cpu")


def test_train_a_transformers_model(checkpoints, tmp_path):
    """`clipkit train` fine-tunes a transformers CLIP (ITC + the ITM head); the checkpoint loads back onto it."""
    from clipkit.train import TrainConfig, checkpoint_paths, train

    path = str(checkpoints["clip"])
    config = TrainConfig(data="synthetic:96", out=str(tmp_path / "run"), model=path, steps=6, batch_size=16, lr=1e-3,
                         warmup=1, itm=True, itm_width=32, itm_layers=1, itm_heads=2, seed=0, workers=0,
                         log_every=2, val_every=100, ckpt_every=3, val=None)
    train(config)
    last = checkpoint_paths(Path(config.out))[-1]
    tuned = clipkit.load_model(path, pretrained=str(last), device="cpu")
    base = clipkit.load_model(path, device="cpu")
    assert tuned.fingerprint != base.fingerprint and tuned.itm is not None
    state = torch.load(last, weights_only=True)
    assert any(k.startswith("model.text_model") for k in state["model"])
    log = [json.loads(line) for line in (Path(config.out) / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses and all(np.isfinite(losses))


def test_served_and_evaluated_like_open_clip_models(checkpoints, image_folder):
    """The server and the benchmark take a transformers model through the same paths as open_clip ones."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.data.captions import synthetic_set
    from clipkit.evaluate import evaluate
    from clipkit.serve import create_app

    model = clipkit.load_model(str(checkpoints["siglip"]), device="cpu")
    index = clipkit.Index.from_folder(image_folder, model)
    expected = clipkit.search("a red circle", index, k=3)
    with TestClient(create_app(index)) as client:
        info = client.get("/healthz").json()["indexes"]["default"]
        assert info["model"] == str(checkpoints["siglip"].resolve()) and info["dim"] == 32
        results = client.post("/search", json={"text": "a red circle", "k": 3}).json()["results"]
    assert [r["item_id"] for r in results] == [h.id for h in expected]
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in expected], atol=1e-5)

    data = synthetic_set(12, seed=2)
    result = evaluate(model, data)
    similarity = clipkit.encode(data.captions, model=model) @ clipkit.encode(data.images, model=model).T
    owner = np.asarray(data.text_to_image)
    t2i_at_1 = np.mean(np.argmax(similarity, axis=1) == owner)  # by hand: each caption's best image
    i2t_at_1 = np.mean([owner[np.argmax(similarity[:, i])] == i for i in range(len(data.images))])
    assert result.itc["t2i_R@1"] == pytest.approx(t2i_at_1) and result.itc["i2t_R@1"] == pytest.approx(i2t_at_1)


def test_siglip2_indexes_and_searches_like_transformers(checkpoints, tmp_path):
    """SigLIP 2's NaFlex inputs (patches, their mask and grid) travel through folder indexing and search."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for n, picture in enumerate(images()):
        picture.save(folder / f"{n}.png")
    path = checkpoints["siglip2"]
    index = clipkit.Index.from_folder(folder, clipkit.load_model(str(path), device="cpu"))
    expected_text, expected_image = reference(path, TEXTS[:1], [Image.open(folder / f"{n}.png") for n in range(3)])
    np.testing.assert_allclose(index.embeddings([str(folder / f"{n}.png") for n in range(3)]), expected_image,
                               atol=1e-4)
    hits = clipkit.search(TEXTS[0], index, k=3)
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected_image @ expected_text[0])[::-1], atol=1e-4)
