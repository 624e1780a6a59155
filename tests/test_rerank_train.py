"""The late-interaction ITM head and its second training stage (clipkit.rerank_train)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipkit
from clipkit.data.captions import synthetic_set
from clipkit.data.synthetic import write_synthetic
from clipkit.encode import load_image
from clipkit.errors import CheckpointError
from clipkit.evaluate import evaluate
from clipkit.itm import LateInteractionHead, image_states, match_scores, text_states
from clipkit.models import export_compact, load_model, save_checkpoint
from clipkit.rerank_train import RerankConfig, cache_gallery, i2t_loss, rerank_top1, step_loss, train_rerank_head


def reference_score(head: LateInteractionHead, states: torch.Tensor, padding: torch.Tensor,
                    pixels: torch.Tensor) -> float:
    """One pair, token by token: mean over the caption's tokens after the first of the best cosine over
    the stem's tokens, times the scale."""
    with torch.no_grad():
        text = head.text(states)
        image = head.image(head.stem(pixels[None]))[0]
        best = []
        for position in range(1, len(text)):
            if padding[position]:
                continue
            cosines = [float(torch.nn.functional.cosine_similarity(text[position], patch, dim=0)) for patch in image]
            best.append(max(cosines))
        return float(head.scale) * float(np.mean(best))


@pytest.fixture(scope="module")
def late_head(tiny_model):
    torch.manual_seed(0)
    head = LateInteractionHead(text_states(tiny_model, ["a"])[0].shape[-1], tiny_model.image_size, width=16).eval()
    with torch.no_grad():
        head.scale.fill_(7.0)
    return head


def test_late_head_scores_match_the_token_by_token_reference(tiny_model, late_head):
    data = synthetic_set(6, seed=3, size=32)
    captions = data.captions[:5]
    states, padding = text_states(tiny_model, captions)
    pixels = torch.stack([tiny_model.preprocess(image) for image in data.images])
    images = late_head.image_input(pixels)
    expected = np.array([[reference_score(late_head, states[t], padding[t], pixels[i]) for i in range(len(pixels))]
                         for t in range(len(captions))])
    with torch.no_grad():
        matrix = late_head.score_matrix(states, padding, images).numpy()
    np.testing.assert_allclose(matrix, expected, rtol=1e-4, atol=1e-4)
    rows = torch.arange(len(captions)).repeat_interleave(len(pixels))
    cols = torch.arange(len(pixels)).repeat(len(captions))
    paired = match_scores(late_head, states[rows], padding[rows], images, cols, batch_size=7).numpy()
    np.testing.assert_allclose(paired.reshape(len(captions), -1), expected, rtol=1e-4, atol=1e-4)


def test_training_resumes_exactly_after_an_interruption(tiny_model, tmp_path, monkeypatch):
    import clipkit.rerank_train as rerank_train

    galleries = [synthetic_set(20, seed=s, size=32) for s in (1, 2)]
    config = RerankConfig(steps=6, captions=4, k=4, random=3, width=16, save_every=2, warmup=2)
    straight, report = train_rerank_head(tiny_model, galleries, config, progress=False)
    assert report["rerank_weight"] in rerank_train.WEIGHT_GRID and report["loss_last_50"] is not None

    calls = {"n": 0}
    real = rerank_train.step_loss

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: steps 1-2 were saved, step 3 was not
            raise KeyboardInterrupt
        return real(*args)

    state = tmp_path / "state.pt"
    monkeypatch.setattr(rerank_train, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_rerank_head(tiny_model, galleries, config, state_path=state, progress=False)
    monkeypatch.setattr(rerank_train, "step_loss", real)
    assert torch.load(state, weights_only=False)["step"] == 2
    resumed, _ = train_rerank_head(tiny_model, galleries, config, state_path=state, progress=False)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)
    assert any(not torch.equal(value, LateInteractionHead(**{**straight.config}).state_dict()[name])
               for name, value in straight.state_dict().items() if name != "scale")
    with pytest.raises(ValueError, match="other settings"):
        train_rerank_head(tiny_model, galleries, RerankConfig(steps=7, captions=4, k=4, width=16),
                          state_path=state, progress=False)


def test_step_loss_is_cross_entropy_over_the_union_of_candidates(tiny_model, late_head):
    g = cache_gallery(tiny_model, synthetic_set(15, seed=4, size=32), k=3)
    captions = torch.tensor([0, 5, 9])
    generator = torch.Generator().manual_seed(1)
    loss = step_loss(late_head, g, captions, 2, generator)
    extra = torch.randint(len(g.images), (2,), generator=torch.Generator().manual_seed(1))
    candidates = sorted(set(g.top[captions].reshape(-1).tolist()) | set(g.text_to_image[captions].tolist())
                        | set(extra.tolist()))
    with torch.no_grad():
        scores = late_head.score_matrix(g.texts[captions], g.padding[captions],
                                        late_head.image_input(g.images[candidates]))
    own = [candidates.index(int(i)) for i in g.text_to_image[captions]]
    expected = float(np.mean([torch.logsumexp(scores[r], 0) - scores[r, own[r]] for r in range(3)]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_exported_late_head_reranks_in_evaluation_and_search(tiny_model, late_head, tmp_path, image_folder):
    late_head.config["rerank_weight"] = 4.0
    towers = tmp_path / "towers.pt"
    save_checkpoint(tiny_model, towers)
    exported = tmp_path / "with-late-head.pt"
    export_compact(towers, exported, itm=late_head)
    model = load_model("clipkit-tiny", pretrained=exported, device="cpu")
    assert isinstance(model.itm, LateInteractionHead) and model.itm.rerank_weight == 4.0

    # evaluation re-ranks ITC's top k by score + the head's own weight x cosine: the same R@1 as the stage's
    # own re-ranking of the cached gallery (an independent code path)
    data = synthetic_set(24, seed=6, size=32)
    result = evaluate(model, data, rerank=True, rerank_k=5)
    assert result.weight == 4.0
    g = cache_gallery(model, data, k=5)
    assert result.rerank["t2i_R@1"] == pytest.approx(rerank_top1(model.itm, g, weights=(4.0,))[4.0])
    assert evaluate(model, data, rerank=True, rerank_k=5, weight=0.0).weight == 0.0

    # search: the head reads the pixels through its own stem, not the tower's tokens
    index = clipkit.Index.from_folder(image_folder, model=model)
    hits = clipkit.search("a red circle", index, k=4, rerank=True, rerank_k=6)
    itc = clipkit.search("a red circle", index, k=6)
    states, padding = text_states(model, ["a red circle"])
    expected = {}
    query = clipkit.encode(["a red circle"], model=model)[0]
    for hit in itc:  # images decoded in full; the cosine is the head's own model's, of that decode
        picture = load_image(hit.path)
        score = match_scores(model.itm, states, padding, image_states(model, model.preprocess(picture)[None])).item()
        expected[hit.id] = score + 4.0 * float(clipkit.encode([picture], model=model)[0] @ query)
    assert [h.id for h in hits] == sorted(expected, key=lambda i: -expected[i])[:4]
    assert all(h.score == pytest.approx(expected[h.id], abs=1e-4) for h in hits)


def test_unknown_head_kind_is_a_clear_checkpoint_error(tiny_model, tmp_path):
    towers = tmp_path / "towers.pt"
    save_checkpoint(tiny_model, towers)
    raw = torch.load(towers, weights_only=False)
    raw["itm"], raw["itm_config"] = {"w": torch.zeros(1)}, {"kind": "mystery"}
    torch.save(raw, towers)
    with pytest.raises(CheckpointError, match="cannot build a head"):
        load_model("clipkit-tiny", pretrained=towers, device="cpu")


def test_split_set_keeps_each_caption_with_its_image():
    from clipkit.rerank_train import split_set

    data = synthetic_set(7, seed=2, size=32)
    parts = split_set(data, 3)
    assert [len(p.images) for p in parts] == [3, 3, 1]
    pairs = [(caption, part.images[i]) for part in parts for caption, i in zip(part.captions, part.text_to_image)]
    assert pairs == [(c, data.images[i]) for c, i in zip(data.captions, data.text_to_image)]


def test_zero_steps_fits_the_models_own_head_to_the_users_data(tiny_ckpt, tmp_path, capsys):
    """`train-rerank --kind fusion --steps 0`: no training; the model's own head, its cosine weights fitted on
    --data's galleries (all of them: the head never trained on any), as `fit_weights` fits them there."""
    from clipkit.cli import main
    from clipkit.itm import build_itm_head
    from clipkit.rerank_train import fit_weights, training_galleries

    model = load_model("clipkit-tiny", pretrained=tiny_ckpt, device="cpu")
    torch.manual_seed(0)
    model.itm = build_itm_head(model.clip, width=16, layers=1, heads=2)
    with_head = tmp_path / "with-head.pt"
    save_checkpoint(model, with_head)
    folder = tmp_path / "mine"
    write_synthetic(folder, 40, seed=9, size=32, layout="folder", workers=1)
    out = tmp_path / "fitted.pt"
    assert main(["train-rerank", "--model", "clipkit-tiny", "--pretrained", str(with_head), "--kind", "fusion",
                 "--steps", "0", "--data", str(folder), "--gallery-size", "20", "--k", "4", "--out", str(out)]) == 0
    assert "the model's own, fitted on 2 galleries" in capsys.readouterr().out
    fitted = load_model("clipkit-tiny", pretrained=out, device="cpu")
    assert all(torch.equal(fitted.itm.state_dict()[k], v.float()) for k, v in model.itm.state_dict().items())
    model = load_model("clipkit-tiny", pretrained=with_head, device="cpu")
    cached = [cache_gallery(model, g, 4, kind="fusion") for g in training_galleries(str(folder), 20, 32)]
    expected = fit_weights(copy_of(model.itm), cached)
    assert fitted.itm.config["rerank_weight"] == expected["rerank_weight"]
    assert fitted.itm.config["rerank_weight_i2t"] == expected["rerank_weight_i2t"]
    assert main(["train-rerank", "--model", "clipkit-tiny", "--pretrained", str(with_head), "--steps", "0",
                 "--data", str(folder), "--out", str(tmp_path / "no.pt")]) == 2  # a late head must be trained
    assert "0 steps: --kind fusion" in capsys.readouterr().err and not (tmp_path / "no.pt").exists()


def copy_of(head):
    import copy

    return copy.deepcopy(head).float().eval()


def test_the_fitted_weight_is_judged_as_the_evaluation_judges_it(tiny_model, tiny_ckpt):
    """The cosine weight is fitted on re-ranked R@1 counted as `clipkit eval` counts it: a caption that two
    images share ties, and a tie counts against the query (it counted as a hit, and the weight it chose
    for image -> text lowered that direction's R@1 on unseen galleries)."""
    from clipkit.itm import build_itm_head
    from clipkit.rerank_train import rerank_top1_i2t

    model = load_model("clipkit-tiny", pretrained=tiny_ckpt, device="cpu")
    torch.manual_seed(0)
    model.itm = build_itm_head(model.clip, width=16, layers=1, heads=2).eval()
    data = synthetic_set(24, seed=5, size=32)
    firsts = [data.captions[int(np.flatnonzero(data.text_to_image == i)[0])] for i in range(len(data.images))]
    data.captions = [firsts[i - i % 2] for i in range(len(data.images))]  # images 2j and 2j+1 share a caption
    data.text_to_image = np.arange(len(data.images))
    g = cache_gallery(model, data, 16, kind="fusion")
    for weight in (0.0, 4.0, 1000.0):
        result = evaluate(model, data, rerank=True, rerank_k=16, weight=weight)
        assert result.rerank["i2t_R@1"] == 0.0  # (every image's caption ties with its twin's)
        assert rerank_top1(model.itm, g, (weight,))[weight] == pytest.approx(result.rerank["t2i_R@1"])
        assert rerank_top1_i2t(model.itm, g, (weight,))[weight] == pytest.approx(result.rerank["i2t_R@1"])


def test_weights_are_fitted_on_galleries_the_head_does_not_train_on(tmp_path):
    from clipkit.rerank_train import held_out_galleries, split_set

    data = synthetic_set(7, seed=3, size=32)
    galleries = split_set(data, 3)  # 3, 3, 1 images
    train, fitting = held_out_galleries("photos/", galleries, gallery_size=3, image_size=32)
    assert [id(g) for g in train] == [id(galleries[0]), id(galleries[2])] and fitting[0] is galleries[1]
    halves = split_set(data, 5)  # 5, 2 images: one gallery worth fitting on, kept for training
    assert held_out_galleries("photos/", halves, gallery_size=5)[1] == []
    train, fitting = held_out_galleries("synthetic:6", galleries[:2], gallery_size=3, image_size=32)
    assert len(train) == 2 and [g.meta["split"] for g in fitting] == ["val", "val"]


def test_training_galleries_from_a_captioned_folder_or_table(tmp_path):
    """train-rerank --data takes what `clipkit train --data` takes: a folder of captioned images, a table."""
    from clipkit.rerank_train import training_galleries

    folder = tmp_path / "photos"
    write_synthetic(folder, 7, seed=3, size=32, layout="folder", workers=1)
    galleries = training_galleries(str(folder), gallery_size=3)
    assert [len(g.images) for g in galleries] == [3, 3, 1] and all(len(g.captions) >= len(g.images) for g in galleries)
    rows = [(Path(image).name, caption) for g in galleries for caption, i in zip(g.captions, g.text_to_image)
            for image in [g.images[i]]]
    assert all((folder / Path(name).with_suffix(".txt").name).read_text().count(caption) for name, caption in rows)
    names = sorted({Path(image).name for g in galleries for image in g.images})[:4]
    (tmp_path / "t.csv").write_text("image,caption\n" + "".join(f"photos/{name},x{n}\n" for n, name in enumerate(names)))
    assert [len(g.images) for g in training_galleries(str(tmp_path / "t.csv"), gallery_size=3)] == [3, 1]


def test_train_rerank_command_writes_a_loadable_model(tiny_model, tiny_ckpt, tmp_path, capsys, image_folder,
                                                     monkeypatch):
    from clipkit.cli import main

    out = tmp_path / "reranker.pt"
    common = ["train-rerank", "--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--steps", "3",
              "--captions", "4", "--k", "4", "--random", "2", "--width", "16", "--out", str(out), "--quiet"]
    assert main(common + ["--data", "synthetic:40", "--gallery-size", "20"]) == 0
    model = load_model("clipkit-tiny", pretrained=out, device="cpu")
    assert isinstance(model.itm, LateInteractionHead) and model.itm.config["width"] == 16
    assert not (tmp_path / "reranker.pt.state").exists()
    texts = ["a red circle", "two blue squares"]
    np.testing.assert_allclose(clipkit.encode(texts, model=model), clipkit.encode(texts, model=tiny_model),
                               atol=1e-6)  # the towers are unchanged
    # the file is a re-ranker as it is (--reranker FILE: it said "unknown model"): the model it names, these weights
    from clipkit.rerankers import load_reranker, score_pairs

    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    np.testing.assert_allclose(score_pairs(images, texts, reranker=load_reranker(str(out), device="cpu")),
                               score_pairs(images, texts, reranker=load_reranker(model)), atol=1e-6)
    indexed = clipkit.Index.from_folder(image_folder, model=str(out), batch_size=4)  # --model FILE, as well
    assert indexed.model_info["name"] == "clipkit-tiny" and indexed.model_info["pretrained"] == str(out)
    import clipkit.models as models

    reads = []
    read = models.read_checkpoint
    monkeypatch.setattr(models, "read_checkpoint", lambda path: reads.append(str(path)) or read(path))
    assert load_model(str(out), device="cpu").itm.config["width"] == 16 and reads == [str(out)]  # the file read once
    legacy = tmp_path / "legacy.pt"  # a file torch cannot memory-map: its name is read in full
    torch.save(torch.load(out, weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert load_model(str(legacy), device="cpu").itm.config["width"] == 16 and reads[1:] == [str(legacy)] * 2
    with pytest.raises(ValueError, match="does not name its model"):
        torch.save({"visual.proj": torch.zeros(2, 2)}, tmp_path / "bare.pt")
        load_reranker(str(tmp_path / "bare.pt"))
    assert main(common + ["--data", "synthetic:5", "--gallery-size", "20"]) == 2
    assert "fewer images than one gallery" in capsys.readouterr().err


def test_fusion_step_loss_is_cross_entropy_over_each_captions_own_top_k(tiny_model):
    from clipkit.itm import build_itm_head

    torch.manual_seed(0)
    head = build_itm_head(tiny_model.clip, width=16, layers=1, heads=2).eval()
    g = cache_gallery(tiny_model, synthetic_set(15, seed=4, size=32), k=3, kind="fusion")
    assert g.images.ndim == 3  # the image tower's tokens, not pixels
    missed = [t for t in range(len(g.text_to_image)) if int(g.text_to_image[t]) not in g.top[t].tolist()]
    hit = [t for t in range(len(g.text_to_image)) if t not in missed]
    captions = torch.tensor((missed[:1] + hit)[:3])
    loss = step_loss(head, g, captions, 5, torch.Generator().manual_seed(1))
    terms = []
    for t in captions.tolist():
        own = int(g.text_to_image[t])
        candidates = g.top[t].tolist()
        if own not in candidates:
            candidates[-1] = own  # ITC missed it: it takes the last place
        scores = match_scores(head, g.texts[[t] * 3], g.padding[[t] * 3], g.images.float(),
                              torch.tensor(candidates))
        terms.append(float(torch.logsumexp(scores, 0) - scores[candidates.index(own)]))
    assert loss.item() == pytest.approx(float(np.mean(terms)), rel=1e-4)


@pytest.mark.parametrize("kind", ["fusion", "late"])
def test_image_to_text_loss_is_each_images_cross_entropy_over_its_top_k_captions(tiny_model, late_head, kind):
    """Pair by pair: each image's k best captions by ITC (one of its own put last where ITC missed them all),
    minus the log of the softmax mass its own captions hold."""
    from clipkit.itm import build_itm_head

    torch.manual_seed(0)
    head = late_head if kind == "late" else build_itm_head(tiny_model.clip, width=16, layers=1, heads=2).eval()
    g = cache_gallery(tiny_model, synthetic_set(15, seed=4, size=32), k=3, kind=kind)
    similarity = g.image_emb @ g.text_emb.T
    tops = similarity.topk(4, dim=1).indices.tolist()
    owned = [[t for t in range(len(g.text_to_image)) if int(g.text_to_image[t]) == i] for i in range(len(tops))]
    missed = [i for i, top in enumerate(tops) if not set(top) & set(owned[i])]
    images = torch.tensor((missed[:1] + [i for i in range(len(tops)) if i not in missed])[:4])
    assert missed, "the tiny model's ITC should miss some image's captions (the case tested)"
    with torch.no_grad():
        pictures = head.image_input(g.images) if kind == "late" else g.images.float()
    terms = []
    for i in images.tolist():
        candidates = list(tops[i])
        if not set(candidates) & set(owned[i]):
            candidates[-1] = min(owned[i])  # ITC missed them all: its first caption takes the last place
        with torch.no_grad():
            scores = match_scores(head, g.texts[candidates], g.padding[candidates], pictures,
                                  torch.tensor([i] * len(candidates)))
        own = torch.tensor([c in owned[i] for c in candidates])
        terms.append(float(torch.logsumexp(scores, 0) - torch.logsumexp(scores[own], 0)))
    with torch.no_grad():
        loss = i2t_loss(head, g, images, k=4)
    assert loss.item() == pytest.approx(float(np.mean(terms)), rel=1e-4)


def test_each_step_adds_the_image_to_text_loss_of_its_captions_images_by_its_weight(tiny_model, monkeypatch):
    import clipkit.rerank_train as rerank_train

    seen, real = [], rerank_train.i2t_loss

    def recorded(head, g, images, k):
        seen.append((g, images.tolist(), k))
        return real(head, g, images, k)

    monkeypatch.setattr(rerank_train, "i2t_loss", recorded)
    galleries = [synthetic_set(20, seed=1, size=32)]
    for weight in (0.0, 1.0, 3.0):
        seen.clear()
        config = RerankConfig(steps=2, captions=4, k=4, random=3, width=16, warmup=1, i2t_weight=weight)
        _, report = train_rerank_head(tiny_model, galleries, config, progress=False)
        losses = report["loss_first_50"]
        if weight == 0:
            assert seen == []
            base = losses
            continue
        assert [k for _, _, k in seen] == [4, 4]  # each step, the step's captions' images
        g = seen[0][0]
        assert all(images == sorted(images) and len(images) <= 4 and set(images) <= set(g.text_to_image.tolist())
                   for _, images, _ in seen)
        assert losses > base  # (the first steps: the image -> text term, weighted, is added to the loss)
        base = losses
    with pytest.raises(ValueError, match="i2t_weight must be >= 0"):
        RerankConfig(i2t_weight=-1).validate()


class Contrary(torch.nn.Module):
    """A head whose scores are loud noise (a hash of its inputs): re-ranking by it lowers R@1 at any weight."""

    def __init__(self):
        super().__init__()
        self.config = {}

    def forward(self, text, padding, images, image_index=None):
        image = images if image_index is None else images[image_index]
        noise = torch.sin(1e3 * text.sum(dim=(1, 2)) + 7e2 * image.reshape(len(image), -1).sum(dim=1))
        return torch.stack([torch.zeros_like(noise), 1e4 * noise], dim=1)


def test_a_head_that_lowers_recall_where_it_is_fitted_is_warned_about(caplog):
    from clipkit.rerank_train import fit_weights

    demo = load_model("clipkit-demo", device="cpu")  # (towers that retrieve: ITC alone has a recall to lower)
    g = cache_gallery(demo, synthetic_set(30, seed=5, split="val"), k=16, kind="fusion")
    similarity, own = (g.text_emb @ g.image_emb.T).numpy(), g.text_to_image.numpy()
    t2i = np.mean([similarity[t, own[t]] > np.delete(similarity[t], own[t]).max() for t in range(len(own))])
    i2t = np.mean([similarity[own == i, i].max() > similarity[own != i, i].max()
                   for i in range(similarity.shape[1])])
    with caplog.at_level("WARNING", logger="clipkit.rerank_train"):
        report = fit_weights(Contrary(), [g])
    assert report["itc_r1"] == pytest.approx(t2i) and report["itc_i2t_r1"] == pytest.approx(i2t) and t2i > 0.3
    assert [line.split()[0] for line in report["lowers"]] == ["t2i", "i2t"]
    assert "re-ranking with this head lowers R@1" in caplog.text and "search without re-ranking" in caplog.text


def test_fusion_stage_fine_tunes_a_copy_of_the_models_head_and_fits_its_weight(tiny_model, tiny_ckpt, tmp_path):
    from clipkit.cli import main
    from clipkit.itm import ITMHead, build_itm_head

    model = load_model("clipkit-tiny", pretrained=tiny_ckpt, device="cpu")
    torch.manual_seed(0)
    model.itm = build_itm_head(model.clip, width=16, layers=1, heads=2)
    with_head = tmp_path / "with-head.pt"
    save_checkpoint(model, with_head)
    before = {k: v.clone() for k, v in model.itm.state_dict().items()}
    galleries = [synthetic_set(20, seed=s, size=32) for s in (1, 2)]
    config = RerankConfig(kind="fusion", steps=4, captions=4, k=4, warmup=1)
    head, report = train_rerank_head(model, galleries, config, progress=False)
    assert isinstance(head, ITMHead) and head is not model.itm
    assert all(torch.equal(model.itm.state_dict()[k], v) for k, v in before.items())  # the model's own is untouched
    assert any(not torch.equal(head.state_dict()[k], v) for k, v in before.items())
    assert report["rerank_weight"] in report["train_r1_by_weight"]

    out = tmp_path / "fusion.pt"
    assert main(["train-rerank", "--model", "clipkit-tiny", "--pretrained", str(with_head), "--kind", "fusion",
                 "--steps", "2", "--captions", "4", "--k", "4", "--data", "synthetic:40", "--gallery-size", "20",
                 "--out", str(out), "--quiet"]) == 0
    reloaded = load_model("clipkit-tiny", pretrained=out, device="cpu")
    assert isinstance(reloaded.itm, ITMHead) and reloaded.itm.config["width"] == 16
    assert reloaded.itm.config.get("rerank_weight", 0.0) in (0.0, *report["train_r1_by_weight"])
    with pytest.raises(ValueError, match="kind must be one of"):
        RerankConfig(kind="bogus").validate()
