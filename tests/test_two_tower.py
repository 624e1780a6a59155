"""The two-tower model: a BERT text encoder (transformers) and a ResNet image encoder (timm), each with a linear
projection into one space, built by open_clip from a clipkit config and trained by `clipkit train` with InfoNCE
and the ITM head. Tiny random towers written by the test; the shipped config is BERT-base + ResNet-50, 512-d."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

import open_clip  # noqa: E402

import clipkit  # noqa: E402
from clipkit.itm import encode_image_tokens, encode_text_tokens, tower_widths  # noqa: E402
from clipkit.bundled import CONFIG_DIR  # noqa: E402
from conftest import draw_shape  # noqa: E402

NAME = "test-bert-resnet"


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory) -> str:
    """Registers NAME with open_clip: a 2-layer BERT written here and timm's resnet10t, 32-d projections."""
    root = tmp_path_factory.mktemp("two-tower")
    bert = root / "tiny-bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase)]
    transformers.BertTokenizer(vocab={token: n for n, token in enumerate(vocab)}).save_pretrained(bert)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   max_position_embeddings=64)).save_pretrained(bert)
    shipped = json.loads((CONFIG_DIR / "clipkit-bert-resnet50.json").read_text())
    config = {"embed_dim": 32,
              "vision_cfg": {**shipped["vision_cfg"], "timm_model_name": "resnet10t", "image_size": 32},
              "text_cfg": {**shipped["text_cfg"], "hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                           "context_length": 48}}
    (root / f"{NAME}.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / f"{NAME}.json")
    return NAME


def test_shipped_config_is_bert_base_and_resnet50_into_512d():
    config = json.loads((CONFIG_DIR / "clipkit-bert-resnet50.json").read_text())
    assert config["embed_dim"] == 512 and config["vision_cfg"]["timm_model_name"] == "resnet50"
    assert config["text_cfg"]["hf_model_name"] == "bert-base-uncased"
    assert config["vision_cfg"]["timm_proj"] == config["text_cfg"]["hf_proj_type"] == "linear"
    # offline and not cached: one clear line, at once
    code = "import clipkit; clipkit.load_model('clipkit-bert-resnet50', device='cpu')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent-hub-cache"})
    assert run.returncode != 0 and "towers' files could not be loaded" in run.stderr


def test_encodes_as_open_clip_and_yields_token_states(two_tower):
    model = clipkit.load_model(two_tower, device="cpu")
    torch.manual_seed(0)  # clipkit's fixed-seed initialisation, made by open_clip itself
    reference, _, preprocess = open_clip.create_model_and_transforms(two_tower, pretrained_text=False)
    reference.eval()
    tokenizer = open_clip.get_tokenizer(two_tower)
    texts = ["a red circle", "a small blue square left of a cross"]
    images = [draw_shape("red", "circle", size=(40, 40)), draw_shape("blue", "square", size=(40, 40))]
    with torch.no_grad():
        text = F.normalize(reference.encode_text(tokenizer(texts)), dim=-1).numpy()
        pixels = torch.stack([preprocess(i) for i in images])
        image = F.normalize(reference.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(clipkit.encode(texts, model=model), text, atol=1e-5)
    np.testing.assert_allclose(clipkit.encode(images, model=model), image, atol=1e-5)
    with torch.no_grad():  # the ITM head's inputs: the ResNet's last feature map as tokens, BERT's token states
        pooled, tokens = encode_image_tokens(model.clip, pixels)
        text_pooled, text_tokens = encode_text_tokens(model.clip, tokenizer(texts))
    np.testing.assert_allclose(F.normalize(pooled, dim=-1).numpy(), image, atol=1e-5)
    np.testing.assert_allclose(F.normalize(text_pooled, dim=-1).numpy(), text, atol=1e-5)
    assert tokens.shape[0] == 2 and tokens.shape[2] == model.clip.visual.trunk.num_features
    assert tower_widths(model.clip) == (32, tokens.shape[2]) and text_tokens.shape[2] == 32


def test_trained_end_to_end_with_infonce_and_itm(two_tower, tmp_path):
    from clipkit.train import TrainConfig, checkpoint_paths, train

    config = TrainConfig(data="synthetic:96", out=str(tmp_path / "run"), model=two_tower, steps=6, batch_size=16,
                         lr=1e-3, warmup=1, itm=True, itm_width=32, itm_layers=1, itm_heads=2, seed=0, workers=0,
                         log_every=1, ckpt_every=3, val=None, device="cpu")
    train(config)
    rows = [json.loads(line) for line in (Path(config.out) / "log.jsonl").read_text().splitlines()]
    losses = [r for r in rows if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite([r["itc"], r["itm"]]).all() for r in losses)
    last = checkpoint_paths(Path(config.out))[-1]
    tuned = clipkit.load_model(two_tower, pretrained=str(last), device="cpu")
    assert tuned.itm is not None and tuned.fingerprint != clipkit.load_model(two_tower, device="cpu").fingerprint
    folder = tmp_path / "photos"
    folder.mkdir()
    for n, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        draw_shape(colour, shape, size=(40, 40), seed=n).save(folder / f"{n}.png")
    index = clipkit.Index.from_folder(folder, tuned)
    hits = clipkit.search("a red circle", index, k=3, rerank=True, model=tuned)
    assert len(hits) == 3 and all("itc_score" in h.metadata for h in hits)
