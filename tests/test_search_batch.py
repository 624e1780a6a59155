"""Many queries in one run: `clipkit.search_batch`, and `clipkit search` with several QUERYs or `--queries FILE`
(- : stdin, each line answered as it comes), one model load for all of them."""

import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.index import Index


@pytest.fixture
def indexed(image_folder, tmp_path, tiny_ckpt):
    path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(path), "--model", "clipkit-tiny", "--pretrained",
                 str(tiny_ckpt)]) == 0
    return path


def test_search_batch_gives_each_query_what_search_gives_it(indexed, image_folder):
    index = Index.load(indexed)
    picture = Image.open(image_folder / "red circle.png")
    queries = ["a red circle", Path(image_folder / "nested" / "blue circle.gif"), "a green square", picture,
               index.embeddings([index.ids()[3]])[0], np.asarray(picture.convert("RGB"))]
    batched = clipkit.search_batch(queries, index, k=4)
    one_by_one = [clipkit.search(query, index, k=4) for query in queries]
    assert [[h.id for h in hits] for hits in batched] == [[h.id for h in hits] for hits in one_by_one]
    for got, expected in zip(batched, one_by_one):
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
    assert batched[4][0].id == index.ids()[3] and batched[1][0].path.endswith("blue circle.gif")
    assert clipkit.search_batch([], index) == []
    rows = index.embeddings(index.ids()[:3])  # (a 2-D float array: a query a row)
    assert [hits[0].id for hits in clipkit.search_batch(rows, index, k=1)] == index.ids()[:3]
    import torch  # (embeddings as open_clip's encode_image returns them: tensors, half precision too)

    assert [hits[0].id for hits in clipkit.search_batch(torch.from_numpy(rows).half(), index, k=1)] == index.ids()[:3]
    assert [h.id for h in clipkit.search(torch.from_numpy(rows[1]).bfloat16(), index, k=1)] == [index.ids()[1]]
    index.add(torch.from_numpy(rows[:1]), ids=["from a tensor"])
    np.testing.assert_allclose(index.embeddings(["from a tensor"]), rows[:1], atol=1e-6)
    assert index.remove(["from a tensor"]) == 1  # (the index is the module's)


def test_search_batch_embeds_texts_in_batches_and_refuses_what_search_refuses(indexed, image_folder, monkeypatch):
    module = importlib.import_module("clipkit.search")  # (the module: `clipkit.search` is the function)
    index, calls = Index.load(indexed), []
    real = module.encode_texts
    monkeypatch.setattr(module, "encode_texts", lambda texts, model: calls.append(len(texts)) or real(texts, model))
    texts = [f"a red circle number {i}" for i in range(150)]
    hits = clipkit.search_batch(texts, index, k=2)
    assert calls == [150] and len(hits) == 150 and all(len(h) == 2 for h in hits)  # one call: encode batches it
    searched, real_search = [], Index.search_keys
    monkeypatch.setattr(Index, "search_keys", lambda self, q, k, **kw: searched.append(len(q)) or real_search(
        self, q, k, **kw))
    clipkit.search_batch(texts[:40] + list(index.embeddings(index.ids()[:3])), index, k=2)
    assert searched == [40, 3]  # (the queries of a kind searched in one call)
    for bad, message in [("a red circle", "must be a list"), (["ok", ""], "the text query is empty"),
                         (["ok", 3], "unsupported query type int")]:
        with pytest.raises(ValueError, match=message):
            clipkit.search_batch(bad, index)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        clipkit.search_batch(["ok"], index, k=0)
    named = str(image_folder / "red circle.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clipkit.search_batch(["a cat", named], index, k=1)
    assert len(caught) == 1 and "taken as text" in str(caught[0].message) and caught[0].filename == __file__


def test_several_queries_in_one_run(indexed, image_folder, capsys):
    gif = str(image_folder / "nested" / "blue circle.gif")
    assert main(["search", "a red circle", gif, "--index", str(indexed), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n# ") == 1 and out.startswith("# a red circle\n") and f"\n# {gif}\n" in out
    assert main(["search", "a red circle", "--index", str(indexed), "-k", "3", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert main(["search", "a red circle", gif, "missing.jpg", "--index", str(indexed), "-k", "3", "--json"]) == 2
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["query"] for line in lines] == ["a red circle", gif, "missing.jpg"]
    assert lines[0]["hits"] == alone and lines[1]["hits"][0]["path"] == str(Path(gif).resolve())
    assert "image file not found" in lines[2]["error"]
    assert captured.err.count("\n") == 1 and captured.err.startswith("clipkit: error: missing.jpg: image file not")
    assert main(["search", "a red circle", "a blue square", "--index", str(indexed), "-k", "2", "--paths"]) == 0
    groups = capsys.readouterr().out.split("\n\n")
    assert [len(group.splitlines()) for group in groups] == [2, 2, 0]  # (each query's paths, then an empty line)


def test_a_query_file_is_read_in_batches_with_blank_lines_left_out(indexed, tmp_path, capsys, monkeypatch):
    module = importlib.import_module("clipkit.search")
    calls, real = [], module.encode_texts
    monkeypatch.setattr(module, "encode_texts", lambda texts, model: calls.append(len(texts)) or real(texts, model))
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"a red circle number {i}\n" + ("\n  \n" if i % 7 == 0 else "") for i in range(100)))
    assert main(["search", "--queries", str(queries), "--index", str(indexed), "-k", "1", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == [f"a red circle number {i}" for i in range(100)]
    assert calls == [64, 36]  # (a file: 64 lines a batch)
    binary, long = tmp_path / "photo.jpg", tmp_path / "long.txt"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\n\x01\x02\n")
    long.write_text("a red circle\n" + "x" * 70_000 + "\na blue square\n")
    assert main(["search", "--queries", str(long), "--index", str(indexed), "-k", "1"]) == 2
    captured = capsys.readouterr()  # (the lines before it answered; the run stops there)
    assert captured.out.startswith("# a red circle\n") and "a blue square" not in captured.out
    assert "line 2 is over 65,536 characters" in captured.err
    for argv, message in [(["--queries", str(binary)], "line 1 holds NUL bytes: give a text file of queries"),
                          (["--queries", str(tmp_path / "nope.txt")], "no such file"),
                          (["--queries", str(tmp_path)], "is a folder"), ([], "give a QUERY, or --queries FILE"),
                          (["x", "--queries", str(queries)], "not both")]:
        assert main(["search", *argv, "--index", str(indexed)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err


def test_queries_from_stdin_are_answered_one_at_a_time_as_they_come(indexed, image_folder):
    """A program (or someone typing) writes a query, waits for its answer, writes the next: each is answered
    at once, with the model loaded once; an image named by a file name that is not UTF-8 is searched."""
    odd = os.fsencode(str(image_folder / "nested")) + b"/caf\xe9.png"
    Image.open(image_folder / "red circle.png").save(os.fsdecode(odd))
    process = subprocess.Popen([sys.executable, "-m", "clipkit", "search", "--queries", "-", "--index", str(indexed),
                                "-k", "2", "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    answers, seconds = [], []
    try:
        for query in [b"a red circle", b"a blue square", odd, b"nowhere/missing.jpg", b"a green square"]:
            start = time.perf_counter()
            process.stdin.write(query + b"\n")
            process.stdin.flush()
            answers.append(json.loads(process.stdout.readline()))  # (blocks for ever if the line waits for more)
            seconds.append(time.perf_counter() - start)
        process.stdin.close()
        assert process.wait(timeout=60) == 2  # (one query failed)
    finally:
        process.kill()
    assert [len(answer.get("hits", [])) for answer in answers] == [2, 2, 2, 0, 2]
    assert answers[2]["query"].endswith("caf\\xe9.png") and answers[2]["hits"][0]["path"].endswith("red circle.png")
    assert "image file not found" in answers[3]["error"]
    assert b"Traceback" not in process.stderr.read()
    assert max(seconds[1:]) < seconds[0]  # (the model loads for the first; the others only search)


def test_a_query_that_cannot_be_searched_fails_alone(image_folder, tmp_path, capsys):
    """--rerank (the demo model's ITM head): a text query re-ranks images; an image query would re-rank captions,
    which this index lacks: that query's error, the text's hits."""
    gif, indexed = str(image_folder / "nested" / "blue circle.gif"), str(tmp_path / "demo")
    assert main(["-q", "index", str(image_folder), "--index", indexed]) == 0
    assert main(["search", "a red circle", gif, "--rerank", "--index", indexed, "-k", "2", "--json"]) == 2
    captured = capsys.readouterr()
    text, image = [json.loads(line) for line in captured.out.splitlines()]
    assert len(text["hits"]) == 2 and "itc_score" in text["hits"][0]["metadata"]
    assert "cannot be re-ranked" in image["error"] and captured.err.count("\n") == 1
