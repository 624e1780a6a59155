"""Precomputed embeddings in clip-retrieval's layout (img_emb/, text_emb/, metadata/*.parquet), part by part:
against numpy brute force over the files, resumed after a kill, new parts only on a re-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import clipkit  # noqa: E402
from clipkit.cli import main  # noqa: E402
from clipkit.errors import IndexBusyError  # noqa: E402
from clipkit.index import Index  # noqa: E402

COLOURS, SHAPES = ["red", "blue", "green", "yellow", "purple"], ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


def write_part(folder: Path, number: int, captions: list[str], model, *, paths=True, texts=True) -> np.ndarray:
    """One part as clip-retrieval's inference writes it: float16 image embeddings (here: the captions'
    text embeddings plus noise, standing in for images), text embeddings, and the metadata."""
    rng = np.random.default_rng(number)
    text = clipkit.encode(captions, model=model)
    image = text + 0.3 * rng.standard_normal(text.shape).astype(np.float32)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    np.save(folder / "img_emb" / f"img_emb_{number}.npy", image.astype(np.float16))
    if texts:
        np.save(folder / "text_emb" / f"text_emb_{number}.npy", text.astype(np.float16))
    columns = {"caption": captions, "url": [f"https://example.org/{number}/{n}.jpg" for n in range(len(captions))]}
    if paths:
        columns["image_path"] = [f"/data/{number}/{n}.jpg" for n in range(len(captions))]
    pq.write_table(pa.table(columns), folder / "metadata" / f"metadata_{number}.parquet")
    return image.astype(np.float16).astype(np.float32)


def captions_for(number: int, n: int) -> list[str]:
    return [f"a {COLOURS[(i + number) % 5]} {SHAPES[(i * 7 + number) % 4]} number {i}" for i in range(n)]


def test_ingest_searches_like_numpy_and_adds_only_new_parts(tmp_path, demo, capsys):
    emb = tmp_path / "emb"
    first = write_part(emb, 0, captions_for(0, 40), demo)
    second = write_part(emb, 1, captions_for(1, 30), demo, paths=False)  # ids from the url column
    ix = str(tmp_path / "ix")
    assert main(["index", str(emb), "--index", ix, "--model", "clipkit-demo"]) == 0
    assert "ingested 70 embedding(s)" in capsys.readouterr().out
    index = Index.load(ix)
    ids = [f"/data/0/{n}.jpg" for n in range(40)] + [f"https://example.org/1/{n}.jpg" for n in range(30)]
    assert sorted(index.ids()) == sorted(ids)
    assert index.get(["/data/0/3.jpg"])[0]["caption"] == captions_for(0, 40)[3]
    vectors = np.concatenate([first, second])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = clipkit.encode(["a red circle"], model=demo)[0]
    order = np.argsort(-(vectors @ query))[:5]
    hits = clipkit.search("a red circle", index, k=5)  # text queries: the recorded model
    assert [h.id for h in hits] == [ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], (vectors @ query)[order], atol=1e-4)  # stored as float16
    assert len(index.captions) == 70  # captions with their text embeddings: image -> text works
    hit = clipkit.search(vectors[0], index.captions, k=1)[0]
    assert hit.metadata["image_id"] in ids

    assert main(["index", str(emb), "--index", ix]) == 0  # nothing new
    assert "ingested 0 embedding(s), 70 already in" in capsys.readouterr().out
    write_part(emb, 2, captions_for(2, 10), demo, texts=False)  # captions embedded by the recorded model
    assert main(["index", str(emb), "--index", ix]) == 0
    assert "ingested 10 embedding(s), 70 already in" in capsys.readouterr().out
    index = Index.load(ix)
    assert len(index) == 80 and len(index.captions) == 80
    np.testing.assert_allclose(index.captions.embeddings(["/data/2/4.jpg#0"])[0],
                               clipkit.encode([captions_for(2, 10)[4]], model=demo)[0], atol=1e-5)


def test_rows_repeating_an_image_add_its_captions_and_a_kill_before_them_loses_none(tmp_path, demo):
    """clip-retrieval writes one row per image-caption pair (a COCO image: five rows). Each row's caption goes
    to its image once (an exact repeat adds nothing); a run killed after a chunk's images were committed and
    before their captions, run again, ends with every caption, none twice."""
    emb = tmp_path / "emb"
    for sub in ("img_emb", "text_emb", "metadata"):
        (emb / sub).mkdir(parents=True)
    paths = [f"/coco/{n % 4}.jpg" for n in range(9)]  # images 0-3 twice, and image 0 a third time...
    captions = [f"a {COLOURS[n % 5]} {SHAPES[n % 4]}" for n in range(8)] + ["a red circle"]  # ...with row 0's text
    text = clipkit.encode(captions, model=demo)
    image = np.stack([text[n % 4] for n in range(9)])
    np.save(emb / "img_emb" / "img_emb_0.npy", image.astype(np.float16))
    np.save(emb / "text_emb" / "text_emb_0.npy", text.astype(np.float16))
    pq.write_table(pa.table({"image_path": paths, "caption": captions}), emb / "metadata" / "metadata_0.parquet")
    script = ("import os, sys\n"
              "import clipkit.index.ingest as ingest\n"
              "from clipkit.index import Index\n"
              "def dying(*args, **kwargs):\n"
              "    os._exit(9)  # killed after the first chunk's images, before its captions\n"
              "ingest.add_captions = dying\n"
              "index = Index(%d)\n"
              "index.save(sys.argv[1])\n"
              "index.sync_embeddings(sys.argv[2], chunk=6)\n" % demo.dim)
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix"), str(emb)]).returncode == 9
    index = Index.load(tmp_path / "ix")
    assert len(index) == 4 and index.captions is None
    report = index.sync_embeddings(emb, chunk=6)
    assert (report.added, report.unchanged) == (0, 9)
    expected = {f"/coco/{n}.jpg#{line}": captions[n + 4 * line] for n in range(4) for line in (0, 1)}
    assert {r["id"]: r["caption"] for r in index.captions.get(index.captions.ids())} == expected
    np.testing.assert_allclose(index.captions.embeddings(sorted(expected)),
                               text[[int(i[6]) + 4 * int(i[-1]) for i in sorted(expected)]], atol=2e-3)
    hits = clipkit.search(clipkit.encode(["a blue square"], model=demo)[0], index.captions, k=1)
    assert hits[0].id == "/coco/1.jpg#0" and hits[0].metadata["image_id"] == "/coco/1.jpg"


def test_row_numbers_without_metadata_and_a_resumed_kill(tmp_path, demo):
    emb = tmp_path / "emb"
    (emb / "img_emb").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number, rows in enumerate((120, 80)):
        np.save(emb / "img_emb" / f"img_emb_{number}.npy", rng.standard_normal((rows, 16)).astype(np.float16))
    script = ("import os, sys\n"
              "import clipkit.index.ingest as ingest\n"
              "from clipkit.index import Index\n"
              "real = ingest.add_captions\n"
              "calls = []\n"
              "def dying(*args, **kwargs):\n"
              "    calls.append(1)\n"
              "    if len(calls) == 3:\n"
              "        os._exit(9)  # killed after the third chunk's commit\n"
              "    return real(*args, **kwargs)\n"
              "ingest.add_captions = dying\n"
              "index = Index(16)\n"
              "index.save(sys.argv[1])\n"
              "index.sync_embeddings(sys.argv[2], chunk=50)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix"), str(emb)])
    assert killed.returncode == 9
    assert len(Index.load(tmp_path / "ix")) == 120  # 50 + 50 + 20: the first part's chunks, committed
    index = Index.load(tmp_path / "ix")
    report = index.sync_embeddings(emb, chunk=50)
    assert (report.added, report.unchanged) == (80, 120)
    assert sorted(index.ids()) == list(range(200))  # global row numbers, part after part
    stored = index.embeddings(list(range(200)))
    expected = np.concatenate([np.load(emb / "img_emb" / f"img_emb_{n}.npy").astype(np.float32) for n in (0, 1)])
    np.testing.assert_allclose(stored, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


def test_bad_embedding_folders_are_one_line_errors(tmp_path, capsys):
    emb = tmp_path / "emb"
    (emb / "img_emb").mkdir(parents=True)
    np.save(emb / "img_emb" / "img_emb_0.npy", np.ones((4, 8), np.float32))
    (emb / "metadata").mkdir()
    pq.write_table(pa.table({"image_path": ["a", "b"]}), emb / "metadata" / "metadata_0.parquet")
    assert main(["index", str(emb), "--index", str(tmp_path / "ix")]) == 2
    assert "different numbers of rows" in capsys.readouterr().err
    assert main(["index", str(emb), "--index", str(tmp_path / "ix2"), "--model", "clipkit-demo"]) == 2
    assert "8-d embeddings but model clipkit-demo makes" in capsys.readouterr().err


def test_export_round_trip_and_embedding_reader(tmp_path, demo, image_folder, capsys):
    """`clipkit export` + `clipkit index OUT`: the same ids, scores within float16 rounding; the exported folder
    read by embedding_reader (the reader autofaiss and clip-retrieval use) as it is."""
    captioned = [p for p in sorted(image_folder.rglob("*.png")) if not p.name.startswith(".")]
    assert len(captioned) == 2
    for n, path in enumerate(captioned):  # three captions each (COCO has five): every one goes out and back
        path.with_suffix(".txt").write_text(f"caption number {n}\nthe second of {n}\nthe third of {n}\n"
                                            f"the second of {n}\n")  # (a repeated line, as COCO has some)
    ix, out = str(tmp_path / "ix"), tmp_path / "out"
    assert main(["-q", "index", str(image_folder), "--index", ix]) == 0
    index = Index.load(ix)
    assert main(["export", str(out), "--index", ix, "--part-size", "5"]) == 0
    assert ("exported 12 embedding(s) in 3 part(s), 2 with a caption's embedding and 6 further caption(s)"
            in capsys.readouterr().out)
    assert main(["-q", "index", str(out), "--index", str(tmp_path / "back")]) == 0  # the export names its model
    back = Index.load(tmp_path / "back")
    assert back.model_info == index.model_info and sorted(back.ids()) == sorted(index.ids())
    np.testing.assert_allclose(back.embeddings(index.ids()), index.embeddings(), atol=2e-3)
    for query in ("a red circle", "a blue square"):
        mine, theirs = clipkit.search(query, index, k=5), clipkit.search(query, back, k=5)
        np.testing.assert_allclose([h.score for h in mine], [h.score for h in theirs], atol=3e-3)
    caption_ids = sorted(index.captions.ids())
    assert len(caption_ids) == 8 and sorted(back.captions.ids()) == caption_ids
    assert ([r["caption"] for r in back.captions.get(caption_ids)]
            == [r["caption"] for r in index.captions.get(caption_ids)])
    np.testing.assert_allclose(back.captions.embeddings(caption_ids), index.captions.embeddings(caption_ids),
                               atol=2e-3)
    assert main(["-q", "index", str(out), "--index", str(tmp_path / "back")]) == 0  # again: nothing doubles
    assert sorted(Index.load(tmp_path / "back").captions.ids()) == caption_ids
    assert main(["export", str(out), "--index", ix]) == 2  # never over an export
    capsys.readouterr()
    manifest = json.loads((out / "export.json").read_text())  # the same vectors said to be another model's:
    (out / "export.json").write_text(json.dumps({**manifest, "model": {**manifest["model"], "fingerprint": "0" * 16}}))
    assert main(["-q", "index", str(out), "--index", str(tmp_path / "back")]) == 2  # not mixed into this index
    assert "holds embeddings of model 'clipkit-demo'" in capsys.readouterr().err

    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(str(out / "img_emb"), file_format="parquet_npy",
                             meta_columns=["id", "image_path", "caption"], metadata_folder=str(out / "metadata"))
    assert reader.count == 12 and reader.dimension == index.dim
    rows = {}
    for vectors, meta in reader(batch_size=100, start=0, end=reader.count):
        rows.update({i: v for i, v in zip(meta["id"], vectors)})
    assert sorted(rows) == sorted(index.ids())
    np.testing.assert_allclose(np.stack([rows[i] for i in index.ids()]), index.embeddings(), atol=2e-3)


def test_integer_ids_round_trip(tmp_path, capsys):
    vectors = np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32)
    Index.from_embeddings(vectors, ids=list(range(100, 130))).save(tmp_path / "ix")
    assert main(["-q", "export", str(tmp_path / "ix"), str(tmp_path / "out")]) == 0  # export INDEX OUT
    assert main(["-q", "index", str(tmp_path / "out"), "--index", str(tmp_path / "back")]) == 0
    assert Index.load(tmp_path / "back").ids() == list(range(100, 130))
    for bad in (["a", "b", "c"], [str(tmp_path / "ix"), str(tmp_path / "o2"), "--index", str(tmp_path / "ix")],
                [str(tmp_path / "ix")]):  # an index alone: not taken as OUT of the default index
        assert main(["-q", "export", *bad]) == 2
    assert not (tmp_path / "o2").exists()
    assert "is an index: name the folder to write too" in capsys.readouterr().err


def test_mixed_ids_and_their_captions_round_trip(tmp_path):
    """An index whose ids mix integers and text (5 and "5" are two items) goes out and back with every id of
    the same type, and each image's captions (several for an integer id) with it."""
    from clipkit.index.ingest import add_captions

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((6, 16)).astype(np.float32)
    ids = [5, "5", 7, "a.jpg", 12, "b"]
    index = Index.from_embeddings(vectors, ids=ids)
    index.save(tmp_path / "ix")
    texts = rng.standard_normal((5, 16)).astype(np.float32)
    assert add_captions(index, [5, 5, "5", 12, 5], ["one", "two", "text five", "twelve", "one"], texts, None) == 4
    assert main(["-q", "export", str(tmp_path / "ix"), str(tmp_path / "out"), "--part-size", "4"]) == 0
    assert main(["-q", "index", str(tmp_path / "out"), "--index", str(tmp_path / "back")]) == 0
    back = Index.load(tmp_path / "back")
    assert sorted(back.ids(), key=repr) == sorted(ids, key=repr)
    np.testing.assert_allclose(back.embeddings(ids), index.embeddings(ids), atol=2e-3)
    mine = {r["id"]: (r["caption"], r["image_id"]) for r in index.captions.get(index.captions.ids())}
    assert {r["id"]: (r["caption"], r["image_id"]) for r in back.captions.get(back.captions.ids())} == mine
    assert mine["5#1"] == ("two", 5) and mine["5#0"] == ("one", 5)
    assert [h.metadata["image_id"] for h in clipkit.search(texts[1], back.captions, k=1)] == [5]


def test_export_streams_resumes_and_never_writes_over_files(tmp_path, monkeypatch):
    """Export reads the index in one streamed pass (never every id at once); a stopped export goes on where it
    stopped and ends equal to one run straight through; a folder holding anything else, the index's own
    folder, or a stopped export of the index before it changed is refused without touching a file."""
    from clipkit.index import export as export_module
    from clipkit.index.store import Store

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = Index.from_embeddings(vectors, ids=[f"item-{n}" for n in range(40)])
    index.save(tmp_path / "ix")
    monkeypatch.setattr(Store, "ids", lambda self: pytest.fail("export held every id at once"))
    assert main(["-q", "export", str(tmp_path / "ix"), str(tmp_path / "whole"), "--part-size", "7"]) == 0

    written, real_write = [], export_module._write_part

    def stop_after_three(*args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(args[3])
        real_write(*args, **kwargs)

    monkeypatch.setattr(export_module, "_write_part", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_embeddings(Index.load(tmp_path / "ix"), tmp_path / "stopped", part_size=7)
    monkeypatch.setattr(export_module, "_write_part", real_write)
    assert len(list((tmp_path / "stopped" / "img_emb").iterdir())) == 3
    half = tmp_path / "stopped" / "img_emb" / ".img_emb_3.npy.x1y2z3.tmp"  # a part being written when it was killed
    half.write_bytes(b"\x93NUMPY" + bytes(4096))
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom clipkit.index.lock import writer_lock\n"
                               "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()",
                               str(tmp_path / "stopped")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another export is writing there
        with pytest.raises(IndexBusyError, match="the export folder .* is being written by"):
            export_module.export_embeddings(Index.load(tmp_path / "ix"), tmp_path / "stopped", part_size=7)
        assert half.exists()
    finally:
        holder.communicate("")
    done = export_module.export_embeddings(Index.load(tmp_path / "ix"), tmp_path / "stopped", part_size=7)
    assert not half.exists()  # (at LAION size, gigabytes left behind)
    assert done["resumed"] and done["parts"] == 6 and done["rows"] == 40
    for name in sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*.npy")):
        np.testing.assert_array_equal(np.load(tmp_path / "whole" / name), np.load(tmp_path / "stopped" / name))
    meta = pq.read_table(tmp_path / "stopped" / "metadata").to_pydict()
    assert sorted(meta["id"]) == sorted(f"item-{n}" for n in range(40))
    np.testing.assert_allclose(np.concatenate([np.load(tmp_path / "stopped" / "img_emb" / f"img_emb_{n}.npy")
                                               for n in range(6)]), vectors, atol=1e-3)

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    Index.load(tmp_path / "ix").remove(["item-0"])  # the index changed since the stopped export below began
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "export.json").write_text((tmp_path / "whole" / "export.json").read_text()
                                                    .replace('"complete": true', '"complete": false'))
    for target in ("mine", "ix", "ix/vectors", "ix/new", "whole", "stale"):
        before = sorted(p.name for p in (tmp_path / target).rglob("*")) if (tmp_path / target).exists() else None
        assert main(["-q", "export", str(tmp_path / "ix"), str(tmp_path / target)]) == 2, target
        after = sorted(p.name for p in (tmp_path / target).rglob("*")) if (tmp_path / target).exists() else None
        assert before == after, target
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert len(Index.load(tmp_path / "ix")) == 39


def test_export_leaves_damaged_rows_out(tmp_path, capsys):
    vectors = np.eye(8, dtype=np.float32)
    Index.from_embeddings(vectors, ids=list(range(8)), precision="float32").save(tmp_path / "ix")
    [segment] = (tmp_path / "ix" / "vectors").glob("*.vec")
    data = bytearray(segment.read_bytes())
    data[3 * 32:3 * 32 + 4] = np.float32("nan").tobytes()  # row 3's first number: NaN
    segment.write_bytes(bytes(data))
    assert main(["export", str(tmp_path / "ix"), str(tmp_path / "out")]) == 0
    assert "1 damaged embedding(s) left out" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "out" / "metadata").to_pydict()["id"] == [0, 1, 2, 4, 5, 6, 7]
    assert np.isfinite(np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy")).all()


def test_builds_tune_on_remembered_queries_or_captions(tmp_path, demo, capsys):
    """The tuner tunes on queries like the user's: given ones are remembered for every later build (the
    collection grown), and without any an index with captions tunes on them (text-side queries)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    queries = rng.standard_normal((300, 16)).astype(np.float32) + 2.0  # across a gap from the data
    index = Index.from_embeddings(vectors)
    index.save(tmp_path / "ix")
    index.set_index_type("IVF32,Flat", sample_queries=queries)
    assert index.tuning["queries"] == "sample queries" and index.tuning["n_queries"] == 300
    index = Index.load(tmp_path / "ix")
    index.add(rng.standard_normal((500, 16)), ids=list(range(3000, 3500)))
    index.build()  # no queries given: the remembered ones
    assert index.tuning["queries"] == "sample queries" and index.tuning["n_queries"] == 300

    emb = tmp_path / "emb"  # an index with captions, built from clip-retrieval's layout
    write_part(emb, 0, captions_for(0, 400), demo)
    assert main(["-q", "index", str(emb), "--index", str(tmp_path / "cap"), "--index-type", "IVF8,Flat"]) == 0
    assert Index.load(tmp_path / "cap").tuning["queries"] == "caption embeddings"
    from clipkit.index.live import tuning_queries
    from clipkit.index.store import Store

    with pytest.MonkeyPatch.context() as patch:  # drawn from the caption rows, not a list of every caption id
        patch.setattr(Store, "ids", lambda self: pytest.fail("tuning read every caption id"))
        drawn, kind = tuning_queries(Index.load(tmp_path / "cap"), most=50)
    stored = Index.load(tmp_path / "cap").captions.embeddings()
    assert kind == "caption embeddings" and drawn.shape == (50, stored.shape[1])
    assert np.abs(drawn @ stored.T).max(axis=1).min() > 0.999  # each one a stored caption's embedding
    texts = tmp_path / "queries.txt"
    texts.write_text("a red circle\na blue square\n" * 20)
    assert main(["-q", "index", str(emb), "--index", str(tmp_path / "cap"), "--model", "clipkit-demo",
                 "--tune-queries", str(texts)]) == 0
    tuned = Index.load(tmp_path / "cap").tuning
    assert tuned["queries"] == "sample queries" and tuned["n_queries"] == 40


def test_damaged_parts_and_rows(tmp_path, capsys, caplog):
    """A NaN, infinite or zero row is skipped (logged) and the rest of the part goes in; a truncated part, a
    1-D array or an array of objects is a one-line error naming the file (exit 2), and nothing is half-read."""
    import json

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12, 16)).astype(np.float32)
    vectors[2, 3], vectors[5], vectors[9, 0] = np.nan, 0, np.inf
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    log = tmp_path / "skipped.jsonl"
    assert main(["index", str(tmp_path / "emb"), "--index", str(tmp_path / "ix"), "--skipped-log", str(log)]) == 0
    out = capsys.readouterr()
    assert "ingested 9 embedding(s), 0 already in, 3 skipped (3 damaged embedding)" in out.out
    assert "img_emb_0.npy row 5: its embedding is NaN, infinite or zero" in out.err
    assert [json.loads(line)["path"] for line in log.read_text().splitlines()] == ["2", "5", "9"]
    index = Index.load(tmp_path / "ix")
    assert sorted(index.ids()) == [0, 1, 3, 4, 6, 7, 8, 10, 11]
    good = vectors[index.ids()] / np.linalg.norm(vectors[index.ids()], axis=1, keepdims=True)
    np.testing.assert_allclose(index.embeddings(), good, atol=2e-3)
    # a caption whose text embedding is NaN is left out (said), its image and the other captions go in
    (tmp_path / "cap" / "img_emb").mkdir(parents=True)
    (tmp_path / "cap" / "text_emb").mkdir()
    (tmp_path / "cap" / "metadata").mkdir()
    np.save(tmp_path / "cap" / "img_emb" / "img_emb_0.npy", vectors[:2])
    np.save(tmp_path / "cap" / "text_emb" / "text_emb_0.npy", np.stack([vectors[2], vectors[3]]))  # row 0: a NaN
    pq.write_table(pa.table({"image_path": ["x.jpg", "y.jpg"], "caption": ["first", "second"]}),
                   tmp_path / "cap" / "metadata" / "metadata_0.parquet")
    assert main(["index", str(tmp_path / "cap"), "--index", str(tmp_path / "cap-ix")]) == 0
    assert "1 caption embedding(s) are NaN, infinite or zero" in caplog.text
    captions = Index.load(tmp_path / "cap-ix").captions
    assert len(Index.load(tmp_path / "cap-ix")) == 2 and captions.ids() == ["y.jpg#0"]

    for name, write in (("truncated", lambda p: (np.save(p, vectors[:4]), open(p, "r+b").truncate(200))),
                        ("flat", lambda p: np.save(p, vectors[0])),
                        ("objects", lambda p: np.save(p, np.array([{"a": 1}] * 3, dtype=object)))):
        (tmp_path / name / "img_emb").mkdir(parents=True)
        write(tmp_path / name / "img_emb" / "img_emb_0.npy")
        assert main(["index", str(tmp_path / name), "--index", str(tmp_path / "ix")]) == 2, name
        err = capsys.readouterr().err
        assert f"{name}/img_emb/img_emb_0.npy" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(Index.load(tmp_path / "ix").ids()) == [0, 1, 3, 4, 6, 7, 8, 10, 11]
