import csv
import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

import clipkit
from clipkit.cli import main
from clipkit.data import (make_loader, read_karpathy, samples_from_folder, samples_from_table, synthetic_set,
                          write_shards, write_synthetic)
from clipkit.data.shards import Sample
from clipkit.data.synthetic import (COLOURS, SHAPES, Obj, _relation_holds, draw_object, scenes)

from conftest import draw_shape


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, 500, seed=3, maxcount=100, workers=2)
    return out


def read_all(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def digest(folder: Path, glob: str = "*.tar") -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(glob))]


def test_shards_read_back_complete_by_plain_webdataset(synth_dir):
    manifest = json.loads((synth_dir / "train.json").read_text())
    assert manifest["total"] == 500 and len(manifest["shards"]) == 5
    samples = read_all(str(synth_dir / manifest["pattern"]))
    assert len(samples) == 500
    for sample in samples:
        assert {"jpg", "txt", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        captions = sample["txt"].decode().split("\n")
        assert captions == meta["captions"] and 2 <= len(captions) <= 5
        assert {"image_id", "group_id", "kind", "scene", "source"} <= set(meta)
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
    ids = [json.loads(s["json"])["image_id"] for s in samples]
    assert ids == list(range(500))
    assert Counter(json.loads(s["json"])["kind"] for s in samples)["original"] < 400  # many distractors


def test_same_seed_same_bytes_whatever_the_workers(synth_dir, tmp_path):
    write_synthetic(tmp_path / "a", 500, seed=3, maxcount=100, workers=1)
    assert digest(tmp_path / "a") == digest(synth_dir)
    assert (tmp_path / "a" / "train.json").read_bytes() == (synth_dir / "train.json").read_bytes()
    write_synthetic(tmp_path / "b", 500, seed=4, maxcount=100)
    assert not set(digest(tmp_path / "b")) & set(digest(synth_dir))


def test_splits_are_disjoint_and_not_pixel_identical():
    train = {s.image_id for s in scenes(300, seed=0, split="train")}
    test = {s.image_id for s in scenes(300, seed=0, split="test")}
    assert not train & test
    data = synthetic_set(200, seed=0, split="val")
    pixels = {np.asarray(im).tobytes() for im in data.images}
    assert len(pixels) == 200


# -- captions describe their images ---------------------------------------------------------------

PHRASES = {"left of": "left", "to the left of": "left", "on the left of": "left", "right of": "right",
           "to the right of": "right", "on the right of": "right", "above": "above", "over": "above",
           "on top of": "above", "below": "below", "under": "below", "beneath": "below"}
MENTION = re.compile(rf"\b(?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
RELATION = re.compile(r"\b(" + "|".join(sorted(map(re.escape, PHRASES), key=len, reverse=True)) + r")\b")
ITS = {"on its right": "right", "on its left": "left", "below it": "below", "above it": "above"}


def parse_caption(caption: str):
    """(mentions [(size|None, colour, shape)], (first, relation, second) as mention indexes | None)."""
    mentions = [(m.group(1), m.group(2), m.group(3), m.start()) for m in MENTION.finditer(caption)]
    for phrase, relation in ITS.items():  # "A, B on its right": B is right of A
        if phrase in caption:
            return mentions, (1, relation, 0)
    found = RELATION.search(caption)
    if not found:
        return mentions, None
    relation = PHRASES[found.group(1)]
    if caption.endswith(" it"):  # "B with A <rel> it"
        return mentions, (1, relation, 0)
    the = re.search(r"the (\w+) " + re.escape(found.group(1)) + r" the (\w+)", caption)
    if the:  # "a X and a Y, the <shape> <rel> the <shape>"
        shapes = [m[2] for m in mentions]
        return mentions, (shapes.index(the.group(1)), relation, shapes.index(the.group(2)))
    before = [i for i, m in enumerate(mentions) if m[3] < found.start()]
    return mentions, (before[-1], relation, len(before))


def mask_of(obj: Obj, size: int = 64) -> np.ndarray:
    canvas = Image.new("L", (size * 4, size * 4), 0)
    draw_object(ImageDraw.Draw(canvas), obj, size * 4, 255)
    return np.asarray(canvas.resize((size, size), Image.BOX)) >= 250


def nearest_colour(rgb) -> str:
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], rgb)))


def test_captions_and_pixels_agree_with_what_was_drawn(synth_dir):
    checked_pixels = checked_relations = 0
    for sample in read_all(str(synth_dir / "train-{000000..000004}.tar")):
        meta = json.loads(sample["json"])
        scene = meta["scene"]
        objects = [Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in scene["objects"]]
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")).astype(float)
        for obj in objects:  # draw-then-parse: the colour found where the shape was drawn
            mask = mask_of(obj)
            if mask.sum() >= 4:
                assert nearest_colour(image[mask].mean(axis=0)) == obj.colour, (meta["image_id"], obj)
                checked_pixels += 1
        drawn = Counter((o.colour, o.shape) for o in objects)
        for caption in meta["captions"]:
            mentions, relation = parse_caption(caption)
            assert Counter((c, s) for _, c, s, _ in mentions) == drawn, caption
            for size, colour, shape, _ in mentions:
                assert size is None or any(o.size == size for o in objects if (o.colour, o.shape) == (colour, shape))
            if len(objects) == 1:
                assert relation is None, caption
                continue
            first, rel, second = relation
            a, b = (next(o for o in objects if (o.colour, o.shape) == mentions[i][1:3]
                         and mentions[i][0] in (None, o.size)) for i in (first, second))
            assert a is not b, caption  # two mentions that could be one object would be ambiguous
            assert _relation_holds(a, b, rel), (caption, a, b)
            checked_relations += 1
    assert checked_pixels > 900 and checked_relations > 1000


def test_each_distractor_differs_only_in_what_it_says(synth_dir):
    samples = [json.loads(s["json"]) for s in read_all(str(synth_dir / "train-{000000..000004}.tar"))]
    originals = {m["group_id"]: m["scene"] for m in samples if m["kind"] == "original"}
    seen = Counter()
    swapped_fields = {"colour_swap": ("colour", "rgb"), "shape_swap": ("shape",), "size_swap": ("size", "radius"),
                      "relation_swap": ("x", "y")}
    for meta in samples:
        kind = meta["kind"]
        if kind == "original" or meta["group_id"] not in originals:
            continue
        seen[kind] += 1
        original, scene = originals[meta["group_id"]], meta["scene"]
        fields = swapped_fields[kind]
        a0, b0 = original["objects"][:2]
        a1, b1 = scene["objects"][:2]
        for name in a0:
            if name in fields:
                assert (a1[name], b1[name]) == (b0[name], a0[name]), (kind, name)
            else:
                assert (a1[name], b1[name]) == (a0[name], b0[name]), (kind, name)
        assert scene["objects"][2:] == original["objects"][2:]
        assert scene["background"] == original["background"] and scene["texture"] == original["texture"]
        flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
        assert scene["relation"] == (flip[original["relation"]] if kind == "relation_swap" else original["relation"])
        if kind != "relation_swap":  # the same words describe both: bag-of-words cannot tell them apart
            words = lambda s: sorted(w for o in s["objects"] for w in (o["colour"], o["shape"], o["size"]))
            assert words(scene) == words(original)
    assert set(seen) == set(swapped_fields)


# -- reading for training ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return clipkit.load_model("clipkit-tiny")


def loader_keys(urls, model, **kw):
    batches = list(make_loader(urls, model.preprocess, model.tokenizer, 16, shuffle_buffer=50, **kw))
    for batch in batches:
        assert batch["pixels"].shape[1:] == (3, 32, 32) and batch["tokens"].shape == (len(batch["keys"]), 32)
    return [k for b in batches for k in b["keys"]]


def test_loader_order_is_deterministic_and_resumable(synth_dir, model):
    urls = str(synth_dir / "train-{000000..000004}.tar")
    for workers in (0, 2):
        first = loader_keys(urls, model, num_workers=workers, seed=5)
        assert first == loader_keys(urls, model, num_workers=workers, seed=5)
        assert first != loader_keys(urls, model, num_workers=workers, seed=5, epoch=1)
        for skip in (1, 4, 5):
            assert loader_keys(urls, model, num_workers=workers, seed=5, skip_batches=skip) == first[skip * 16:]
    assert len(first) == 480 and len(set(first)) == 480  # every worker drops its last partial batch


def test_group_batches_keep_an_image_and_its_distractors_together(synth_dir, model):
    from clipkit.data.synthetic import scenes

    group_of = {f"{s.image_id:09d}": s.group_id for s in scenes(500, seed=3)}
    sizes = {}
    for key, group in group_of.items():
        sizes[group] = sizes.get(group, 0) + 1
    urls = str(synth_dir / "train-{000000..000004}.tar")

    def runs(keys):  # how many stretches of one group the stream holds, per group
        count = {}
        for position, key in enumerate(keys):
            if position == 0 or group_of[keys[position - 1]] != group_of[key]:
                count[group_of[key]] = count.get(group_of[key], 0) + 1
        return count

    grouped = loader_keys(urls, model, seed=5, drop_last=False, group_batches=True)
    assert sorted(grouped) == sorted(group_of)  # every sample once
    assert all(n == 1 for n in runs(grouped).values())  # each group in one stretch
    assert grouped != sorted(grouped)  # and the groups are shuffled
    assert grouped == loader_keys(urls, model, seed=5, drop_last=False, group_batches=True)
    multi = [g for g, n in sizes.items() if n > 1]
    assert len(multi) > 50
    plain = runs(loader_keys(urls, model, seed=5, drop_last=False))
    assert sum(plain[g] > 1 for g in multi) > len(multi) // 4  # a sample shuffle scatters them


def test_ranks_and_workers_see_every_sample_once(synth_dir, model):
    urls = str(synth_dir / "train-{000000..000004}.tar")
    seen = []
    for rank in range(2):
        seen += loader_keys(urls, model, num_workers=2, rank=rank, world_size=2, drop_last=False)
    assert sorted(seen) == [f"{i:09d}" for i in range(500)]


def test_resampled_mode_draws_with_replacement(synth_dir, model):
    loader = make_loader(str(synth_dir / "train-{000000..000001}.tar"), model.preprocess, model.tokenizer, 16,
                         resampled=True, seed=1, num_workers=0)
    keys = [k for _, batch in zip(range(20), loader) for k in batch["keys"]]
    assert len(keys) == 320 and len(set(keys)) <= 200  # more batches than the two shards hold


def test_too_few_shards_for_workers_is_an_error(synth_dir, model):
    with pytest.raises(ValueError, match="cannot feed 2 rank"):
        make_loader(str(synth_dir / "train-000000.tar"), model.preprocess, model.tokenizer, 8, num_workers=1,
                    rank=0, world_size=2)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        make_loader(str(synth_dir / "nope-{000000..000002}.tar"), model.preprocess, model.tokenizer, 8)


def test_corrupt_sample_and_truncated_shard_are_skipped_and_logged(tmp_path, model, caplog):
    good = [Sample(key=f"{i:04d}", image=_jpeg(i), image_format="jpg", captions=[f"caption {i}"],
                   meta={"image_id": i}) for i in range(40)]
    good[7].image = b"\xff\xd8\xff garbage, not a jpeg"
    write_shards(good, tmp_path, prefix="bad", maxcount=20)
    shard = tmp_path / "bad-000001.tar"
    shard.write_bytes(shard.read_bytes()[:12_000])  # cut off mid-member
    with caplog.at_level(logging.WARNING):
        batches = list(make_loader(str(tmp_path / "bad-{000000..000001}.tar"), model.preprocess, model.tokenizer, 4,
                                   shuffle_buffer=0, drop_last=False))
    keys = [k for b in batches for k in b["keys"]]
    assert "0007" not in keys and all(f"{i:04d}" in keys for i in range(20) if i != 7)
    assert 20 < len(keys) < 39 and sum(b["skipped"] for b in batches) == 1
    assert any("0007" in r.getMessage() for r in caplog.records)


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    draw_shape("red" if i % 2 else "blue", "circle", (40, 40), seed=i).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_shards_without_captions_fail_fast_instead_of_looping(tmp_path, model):
    with tarfile.open(tmp_path / "nocap-000000.tar", "w") as tar:
        for i in range(60):
            for ext, data in (("jpg", _jpeg(i)), ("cls", b"3")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"lack an image .* or caption \(txt\).*keys found: cls, jpg"):
        list(make_loader(str(tmp_path / "nocap-000000.tar"), model.preprocess, model.tokenizer, 4))


# -- other sources ---------------------------------------------------------------------------------


def test_shards_from_a_captioned_folder(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.webp", "no_caption.png", "broken.jpg"]):
        path = folder / name
        if name == "broken.jpg":
            path.write_bytes(b"nope")
        else:
            draw_shape("green", "square", (30, 30), seed=i).save(path)
        if name != "no_caption.png":
            path.with_suffix(".txt").write_text(f"first caption {i}\n\nsecond caption {i}\n")
    skipped = []
    written = write_shards(samples_from_folder(folder, skipped), tmp_path / "out", prefix="photos")
    samples = read_all(str(written[0]))
    assert len(samples) == 3 and sorted(Path(p).name for p, _ in skipped) == ["broken.jpg", "no_caption.png"]
    by_source = {Path(json.loads(s["json"])["source"]).name: s for s in samples}
    assert set(by_source) == {"a.jpg", "b.png", "c.webp"}
    assert by_source["a.jpg"]["txt"].decode() == "first caption 0\nsecond caption 0"
    assert by_source["b.png"]["png"] == (folder / "b.png").read_bytes()  # jpg/png bytes kept as they are
    assert "jpg" in by_source["c.webp"]  # other formats re-encoded
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="never overwritten"):  # shards an index may point at stay as they are
        write_shards(samples_from_folder(folder, []), tmp_path / "out", prefix="photos", maxcount=1)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert write_shards(samples_from_folder(folder, []), tmp_path / "out", prefix="more")  # another prefix: fine


def test_shards_from_csv_and_jsonl(tmp_path):
    for name in ("x.jpg", "y.jpg"):
        draw_shape("red", "triangle", (24, 24)).save(tmp_path / name)
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([["x.jpg", "a red triangle"], ["y.jpg", "another"], ["x.jpg", "a triangle, red"]])
    samples = list(samples_from_table(tmp_path / "captions.csv", image_column="filepath", caption_column="title"))
    assert [s.captions for s in samples] == [["a red triangle", "a triangle, red"], ["another"]]
    (tmp_path / "captions.jsonl").write_text('{"image": "x.jpg", "caption": ["one", "two"]}\n'
                                             '{"image": "missing.jpg", "caption": "gone"}\n')
    skipped = []
    samples = list(samples_from_table(tmp_path / "captions.jsonl", skipped=skipped))
    assert [s.captions for s in samples] == [["one", "two"]] and "missing.jpg" in skipped[0][0]
    with pytest.raises(ValueError, match="lacks column 'filepath' or 'caption'"):  # (its path column is found)
        list(samples_from_table(tmp_path / "captions.csv"))


def test_a_caption_with_line_breaks_stays_one_caption_in_a_shard(tmp_path):
    """A shard's txt holds one caption a line, so a table's caption that spans lines (scraped alt texts often
    do) is written as one line: read back, it is one caption, as the shard's json says, not fragments."""
    from clipkit.cli import main

    draw_shape("red", "square", (24, 24)).save(tmp_path / "x.jpg")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], ["x.jpg", "a red\nsquare\r\n on  grey"], ["x.jpg", "more"]])
    assert main(["-q", "shards", str(tmp_path / "t.csv"), str(tmp_path / "out")]) == 0
    with tarfile.open(next((tmp_path / "out").glob("*.tar"))) as tar:
        parts = {m.name.rpartition(".")[2]: tar.extractfile(m).read() for m in tar.getmembers()}
    parts = {name: parts[name].decode() for name in ("txt", "json")}
    assert parts["txt"].splitlines() == ["a red square on grey", "more"] == json.loads(parts["json"])["captions"]


# -- caption files for evaluation ------------------------------------------------------------------


def test_karpathy_and_blip_caption_files(tmp_path):
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    for name in ("val2014/1.jpg", "val2014/2.jpg", "3.jpg"):
        draw_shape("blue", "circle", (20, 20)).save(tmp_path / "images" / name)
    karpathy = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "1.jpg", "split": "test", "sentences": [{"raw": "one a"}, {"raw": "one b"}]},
        {"filepath": "val2014", "filename": "2.jpg", "split": "test", "sentences": [{"raw": "two a"}]},
        {"filename": "3.jpg", "split": "train", "sentences": [{"raw": "three"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    data = read_karpathy(tmp_path / "dataset_coco.json", tmp_path / "images", split="test")
    assert [p.name for p in data.images] == ["1.jpg", "2.jpg"]
    assert data.captions == ["one a", "one b", "two a"] and data.text_to_image.tolist() == [0, 0, 1]
    blip = [{"image": "val2014/2.jpg", "caption": ["x", "y"]}, {"image": "3.jpg", "caption": "z"}]
    (tmp_path / "test.json").write_text(json.dumps(blip))
    data = read_karpathy(tmp_path / "test.json", tmp_path / "images")
    assert data.text_to_image.tolist() == [0, 0, 1] and data.captions == ["x", "y", "z"]
    with pytest.raises(ValueError, match="no images in split 'val'; its splits: test, train"):
        read_karpathy(tmp_path / "dataset_coco.json", tmp_path / "images", split="val")
    (tmp_path / "images" / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 2 images"):
        read_karpathy(tmp_path / "test.json", tmp_path / "images")


def test_synthetic_retrieval_set_has_distractors_in_the_gallery():
    data = synthetic_set(120, seed=1)
    assert len(data.images) == 120 and len(data.captions) == len(data.text_to_image)
    groups = Counter(data.group_ids)
    assert max(groups.values()) >= 2 and sum(v for v in groups.values() if v > 1) > 40


def test_synth_and_shards_commands(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "s"), "--n", "300", "--shard-size", "100", "--split", "val"]) == 0
    assert "wrote 300 val images as 3 shard(s)" in capsys.readouterr().out
    assert len(read_all(str(tmp_path / "s" / "val-{000000..000002}.tar"))) == 300
    assert main(["synth", str(tmp_path / "f"), "--n", "5", "--format", "folder"]) == 0
    assert len(list((tmp_path / "f").glob("*.jpg"))) == 5 and len(list((tmp_path / "f").glob("*.txt"))) == 5
    assert main(["shards", str(tmp_path / "f"), str(tmp_path / "fs"), "--prefix", "mine"]) == 0
    assert len(read_all(str(tmp_path / "fs" / "mine-000000.tar"))) == 5
    assert main(["synth", str(tmp_path / "z"), "--size", "8"]) == 2
    assert main(["synth", str(tmp_path / "z"), "--size", "100000", "--n", "1"]) == 2  # 30 GB an image: killed before
    assert "from 16 to 4096 pixels" in capsys.readouterr().err
    assert main(["shards", str(tmp_path / "nothing-here"), str(tmp_path / "o")]) == 2
    assert "source not found" in capsys.readouterr().err
    made = {p: p.stat().st_mtime_ns for root in ("s", "fs", "f") for p in (tmp_path / root).iterdir()}
    assert main(["synth", str(tmp_path / "s"), "--n", "50", "--split", "val"]) == 2  # nothing is overwritten
    assert main(["synth", str(tmp_path / "f"), "--n", "5", "--format", "folder"]) == 2
    assert main(["shards", str(tmp_path / "f"), str(tmp_path / "fs"), "--prefix", "mine"]) == 2
    assert "already holds" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for root in ("s", "fs", "f") for p in (tmp_path / root).iterdir()} == made
    assert main(["-q", "synth", str(tmp_path / "s"), "--n", "50", "--split", "test"]) == 0  # another split: fine


def test_shards_command_lists_skipped_files_once_and_logs_them_all(tmp_path, capsys, monkeypatch):
    """A table with many missing images: the first 20 are named once each (not once as a warning and again in
    a summary), the rest counted; --skipped-log has every one, in order, though past the first 5 (here) they
    were kept on disk, not in memory."""
    from clipkit._io import SkipList
    from clipkit.cli import main

    monkeypatch.setattr(SkipList.__init__, "__defaults__", (5,))

    draw_shape("red", "square", (24, 24)).save(tmp_path / "x.jpg")
    with open(tmp_path / "t.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], ["x.jpg", "a red square"],
                                 *[[f"gone{n}.jpg", "lost"] for n in range(23)]])
    assert main(["-q", "shards", str(tmp_path / "t.csv"), str(tmp_path / "out"),
                 "--skipped-log", str(tmp_path / "skipped.jsonl")]) == 0
    err = capsys.readouterr().err
    assert err.count("gone") == 20 and "... and 3 more skipped; all in" in err
    logged = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [r["path"] for r in logged] == [str(tmp_path / f"gone{n}.jpg") for n in range(23)]


def test_a_skip_list_reads_as_a_list_and_keeps_few_in_memory():
    from clipkit._io import SkipList

    skipped, reference = SkipList(kept=3), []
    for n in range(10):
        entry = (f"caf\udce9-{n}.jpg" if n == 7 else f"{n}.jpg", f"reason \u00e9 {n}")  # (a name not UTF-8 too)
        skipped.append(entry)
        reference.append(entry)
        assert len(skipped) == n + 1 and list(skipped) == reference and skipped[-1] == entry
    assert len(skipped._head) == 3 and skipped[:2] == reference[:2] and skipped[:20] == reference
    assert skipped == reference and dict(skipped) == dict(reference) and bool(skipped) and not SkipList()


def test_the_skipped_log_is_utf8_whatever_the_names(tmp_path):
    """A name that is not UTF-8 (a surrogate escape) is written escaped: the log stays UTF-8 JSON lines."""
    from clipkit.cli import _write_skipped_log

    entries = [("caf\udce9.jpg", "not UTF-8"), ("caf\u00e9.jpg", "fine")]
    _write_skipped_log(str(tmp_path / "log.jsonl"), entries)
    text = (tmp_path / "log.jsonl").read_bytes().decode("utf-8")  # (strict)
    assert [tuple(json.loads(line).values()) for line in text.splitlines()] == entries and "café" in text
