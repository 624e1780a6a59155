import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.index import Index


@pytest.fixture
def tiny_args(tiny_ckpt):
    return ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]


def test_index_then_search(image_folder, tmp_path, tiny_args, capsys):
    index_path = tmp_path / "photos.clipkit"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), *tiny_args]) == 0
    assert main(["index", str(image_folder), "--index", str(index_path)]) == 0  # model from the index
    out = capsys.readouterr()
    assert "indexed 0 image(s)" in out.out and "12 unchanged" in out.out and "1 skipped" in out.out
    assert main(["search", "a red circle", "--index", str(index_path), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5 and all(Path(h["path"]).exists() for h in hits)
    assert hits == sorted(hits, key=lambda h: -h["score"])
    query_image = image_folder / "nested" / "blue circle.gif"
    assert main(["search", str(query_image), "--index", str(index_path), "-k", "2", "--paths"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(query_image.resolve()) and len(lines) == 2
    assert main(["search", "a green square", "--index", str(index_path), "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].split()[0] == "1"


def test_the_index_may_be_given_as_index_and_search_name_it(image_folder, tmp_path, tiny_args, capsys):
    index_path, second = str(tmp_path / "photos.clipkit"), tmp_path / "more"
    assert main(["-q", "index", str(image_folder), index_path, *tiny_args]) == 0  # SOURCE INDEX
    assert Index.load(index_path).model_info and len(Index.load(index_path)) == 12
    assert main(["search", "a red circle", "--index", index_path, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert main(["search", index_path, "a red circle", "--json"]) == 0  # INDEX QUERY
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["search", index_path, "a red circle", "a dog", "-k", "1"]) == 0
    assert capsys.readouterr().out.count("# ") == 2
    assert main(["search", index_path, "--json", "a red circle"]) == 0  # options between the positionals
    assert json.loads(capsys.readouterr().out) == expected
    assert main(["search", index_path, "-k", "1", "a red circle", "--json", "a dog"]) == 0
    assert [json.loads(line)["query"] for line in capsys.readouterr().out.splitlines()] == ["a red circle", "a dog"]
    assert main(["index", str(image_folder), "-q", index_path]) == 0 and not capsys.readouterr().out
    fresh = str(tmp_path / "my photos.clipkit")  # a first index says how to use it; an update does not
    for says in (True, False):
        assert main(["index", str(image_folder), fresh, *tiny_args]) == 0
        assert ("search it: clipkit search 'my photos.clipkit'" in capsys.readouterr().err.replace(
            str(tmp_path) + "/", "")) is says
    refusals = [(["index", str(image_folder), str(second)], f"takes one SOURCE, not also {second}"),  # a 2nd folder?
                (["index", str(image_folder), index_path, "--index", str(tmp_path / "b.clipkit")], "give the index once"),
                (["search", index_path], f"give a QUERY to search {index_path} for"),
                (["index", index_path, str(tmp_path / "b.clipkit")], "is a clipkit index, not images to index"),
                (["search", str(tmp_path / "no.clipkit"), "a dog"], "no index at"),
                (["search", index_path, "a dog", "--server", "http://127.0.0.1:9"], "with --server the index is")]
    for argv, message in refusals:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not second.exists() and not (tmp_path / "b.clipkit").exists()


@pytest.mark.parametrize("argv, message", [
    (["search", "x", "--index", "/no/such/index"], "no index at /no/such/index"),
    (["index", "/no/such/folder"], "folder not found"),
    (["search", "x", "-k", "0"], "must be at least 1"),
    (["search", "fotos", "a dog"], "no index at index.clipkit (the default), and the first QUERY 'fotos' is not"),
    (["search", "holiday/missing.jpg"], "image file not found: holiday/missing.jpg (to search for this text, add --text)"),
    (["index", "."], None),  # placeholder replaced below
    (["frobnicate"], "invalid choice"),
    ([], "a command is required"),
])
def test_errors_are_one_line_exit_2(argv, message, capsys, tmp_path, image_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (no index.clipkit here)
    if argv == ["index", "."]:
        argv, message = ["index", str(image_folder), "--index", str(tmp_path / "i"), "--model", "ViT-B-99"], \
            "unknown model 'ViT-B-99'"
    if "holiday/missing.jpg" in argv:  # (searched in an index that exists: the index is looked at first)
        Index.from_embeddings(np.eye(4, dtype=np.float32)).save(tmp_path / "ix")
        argv = [*argv, "--index", str(tmp_path / "ix")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipkit: error: ") and message in err


def test_a_query_that_names_a_file_is_searched_as_an_image_or_refused(image_folder, tmp_path, tiny_args, capsys):
    """A file given as QUERY is an image query whatever its name (one without an image suffix too); a file
    that is no image, or a folder, is a one-line error rather than a search for its path's words."""
    index_path = str(tmp_path / "ix")
    assert main(["-q", "index", str(image_folder), "--index", index_path, *tiny_args]) == 0
    image = next(p for p in sorted(image_folder.rglob("*.png")) if not p.name.startswith("."))
    bare = tmp_path / "photo-without-suffix"
    bare.write_bytes(image.read_bytes())
    assert main(["search", str(bare), "--index", index_path, "-k", "1", "--paths"]) == 0
    assert capsys.readouterr().out.strip() == str(image.resolve())
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    for query, message in ((notes, "cannot read image"), (image_folder, "is a folder")):
        assert main(["search", str(query), "--index", index_path]) == 2
        err = capsys.readouterr().err
        assert message in err and "add --text" in err and err.count("\n") == 1
    assert main(["search", str(notes), "--text", "--index", index_path, "-k", "1", "-q"]) == 0


def test_model_mismatch_on_existing_index(image_folder, tmp_path, tiny_args, capsys):
    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), *tiny_args]) == 0
    assert main(["index", str(image_folder), "--index", str(index_path), "--model", "clipkit-tiny-rn"]) == 2
    assert "built with model" in capsys.readouterr().err


def test_index_path_that_is_not_an_index(image_folder, tmp_path, tiny_args, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["index", str(image_folder), "--index", str(other), *tiny_args]) == 2
    assert "not a clipkit index" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"


def test_real_process_exit_codes_and_no_traceback(image_folder, tmp_path, tiny_args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    index_path = str(tmp_path / "ix")
    run = subprocess.run([sys.executable, "-m", "clipkit", "-q", "index", str(image_folder), "--index", index_path,
                          *tiny_args], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    search, pipe = [sys.executable, "-m", "clipkit", "search", "red"], subprocess.PIPE
    found = subprocess.Popen([*search, "--index", index_path, "--json"], stdout=pipe, stderr=pipe, text=True, env=env)
    bad = subprocess.Popen([*search, "--index", str(tmp_path / "nope")], stdout=pipe, stderr=pipe, text=True, env=env)
    # a reader that stops early (`clipkit search ... | head -1`): no error for what it did not read
    piped = subprocess.Popen([*search, "--index", index_path, "-k", "12"], stdout=pipe, stderr=pipe, env=env)
    piped.stdout.close()  # (the three side by side)
    out, err = found.communicate(timeout=300)
    assert found.returncode == 0 and len(json.loads(out)) == 10, err
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "Traceback" not in err and err.count("\n") == 1
    assert piped.wait(timeout=300) == 0 and piped.stderr.read() == b""


def test_index_type_option(image_folder, tmp_path, tiny_args, capsys):
    index_path = tmp_path / "typed"
    assert main(["index", str(image_folder), "--index", str(index_path), "--index-type", "auto", *tiny_args]) == 0
    assert "(Flat)" in capsys.readouterr().out
    assert json.loads((index_path / "config.json").read_text())["index_type"] == "auto"
    assert main(["index", str(image_folder), "--index", str(tmp_path / "b"), "--index-type", "IVF-x", *tiny_args]) == 2
    assert "FAISS factory string" in capsys.readouterr().err
    assert main(["index", str(image_folder), "--index", str(tmp_path / "c"), "--index-type", "IVF64,Flat",
                 *tiny_args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs at least 2496 vectors" in err
    kept = clipkit.Index.load(tmp_path / "c")  # the failed switch left a working flat index behind
    assert kept.index_type == "flat" and len(kept) == 12 and kept.structure == "Flat"


def test_unexpected_errors_are_one_line_and_a_traceback_under_v(monkeypatch, capsys):
    import clipkit.cli as cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "roots", broken)
    assert cli.main(["roots"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: RuntimeError: a bug" in err and "run with -v" in err
    assert cli.main(["-v", "roots"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "a bug" in err


def test_no_import_cycles_between_clipkit_modules():
    """Every import of a clipkit module by another, at module level or inside functions, flows one way."""
    import ast
    from pathlib import Path

    root = Path(clipkit.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clipkit"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("clipkit")]
            else:
                continue
            edges[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])


def test_an_untrained_model_is_named_as_such(image_folder, tmp_path, tiny_args, caplog):
    """An architecture named without weights indexes with its random initialisation: said as a warning (the
    embeddings mean nothing); not said for weights given, bundled or recorded by the index."""
    assert main(["index", str(image_folder), "--index", str(tmp_path / "random"), "--model", "clipkit-tiny",
                 "-q"]) == 0  # -q after the command, as before it: no bars or summaries, warnings still said
    assert "clipkit-tiny is untrained here" in caplog.text
    for argv in (tiny_args, ["--model", "clipkit-demo"], []):
        caplog.clear()
        target = tmp_path / (argv[1] if argv else "random")
        assert main(["index", str(image_folder), "--index", str(target), *argv]) == 0
        assert "untrained" not in caplog.text, argv
    assert clipkit.load_model("RN50").untrained and not clipkit.load_model("clipkit-demo").untrained


def test_info_says_what_an_index_is(image_folder, tmp_path, tiny_args, capsys):
    index_path = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(index_path), *tiny_args]) == 0
    assert main(["info", str(index_path), "--json"]) == 0
    about = json.loads(capsys.readouterr().out)
    index = Index.load(index_path)
    on_disk = sum(p.stat().st_size for p in index_path.rglob("*") if p.is_file())
    assert (about["items"], about["dim"], about["structure"], about["bytes"]) == (len(index), index.dim, "Flat", on_disk)
    assert about["model"]["name"] == "clipkit-tiny" and about["folders"] == [{"path": str(image_folder.resolve()),
                                                                              "exists": True, "exclude": []}]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    tuned = Index.from_embeddings(vectors, ids=list(range(3000)), index_type="IVF32,Flat")
    tuned.save(tmp_path / "ivf")
    assert main(["info", "--index", str(tmp_path / "ivf")]) == 0  # as every other command takes it
    text = capsys.readouterr().out
    assert "IVF32,Flat" in text and "3000 (16-d" in text and "model      none recorded" in text
    assert f"recall@10 {tuned.tuning['estimated_recall']:.3f}" in text
    assert f"searches for more than 10: recall@25/50/100 ≥ {tuned.tuning['deep_recall']:.3f}" in text
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert main(["info", str(tmp_path / "ivf"), "--index", str(index_path)]) == 2


def _documented_commands(text: str):
    """The `clipkit ...` lines of a Markdown file's shell blocks, with [optional parts] left out, the first of
    A|B choices taken and `...` placeholders filled."""
    import re

    blocks, fence = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:] if fence is None else None
            blocks += [[]] if fence in ("bash", "sh", "console", "") else []
        elif fence in ("bash", "sh", "console", ""):
            blocks[-1].append(line)
    for block in blocks:
        for line in "\n".join(block).replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if not line.startswith("clipkit "):
                continue
            line = re.split(r"\s+#", line)[0]
            while re.search(r"\[[^\[\]]*\]", line):
                line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
            line = re.sub(r"(--\S+) \.\.\.", r"\1 X", re.sub(r"(\S+)\|\S+", r"\1", line))
            yield line.replace("...", "")


@pytest.mark.parametrize("doc", ["README.md", "docs/scaling.md", "benchmarks/README.md"])
def test_every_documented_command_parses(doc):
    """Each `clipkit` command the docs show is one the CLI takes (an option renamed breaks this, not users)."""
    import shlex

    from clipkit.cli import _command_in, build_parser

    lines = list(_documented_commands((Path(__file__).parent.parent / doc).read_text()))
    assert lines or doc == "benchmarks/README.md"
    for line in lines:
        words = shlex.split(line)[1:]
        build_parser(_command_in(words)).parse_args(words)  # as main parses it; a UsageError names the problem


def test_commands_that_use_no_model_start_without_torch(tmp_path, capsys):
    """`clipkit --help`, `info`, `roots` and the --help of every command load neither torch nor the model
    libraries (seconds on a small machine): only the command that is run builds its options."""
    index = Index(4)
    index.add(np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"])
    index.save(tmp_path / "ix")
    script = ("import sys, contextlib, io\n"
              "from clipkit.cli import main\n"
              "for argv in sys.argv[1:]:\n"
              "    with contextlib.redirect_stdout(io.StringIO()):\n"
              "        try:\n"
              "            assert main(argv.split()) == 0, argv\n"
              "        except SystemExit as exit:\n"
              "            assert exit.code == 0, argv\n"
              "heavy = sorted(m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules)\n"
              "print(heavy)\n")
    lines = ["--version", "--help", f"info {tmp_path / 'ix'}", f"-q roots --index {tmp_path / 'ix'}", "search --help",
             "index --help", "serve --help", "remove --help", "merge --help"]
    done = subprocess.run([sys.executable, "-c", script, *lines], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert main(["eval", "--n-images", "x"]) == 2  # the heavy commands still get their options when run
    assert main(["-q", "train", "--steps", "x"]) == 2
    assert main(["train-rerank", "--gallery-size", "x"]) == 2
    errors = capsys.readouterr().err
    assert "--n-images: 'x' is not an integer" in errors and "--steps: invalid int" in errors
    assert "--gallery-size: invalid int" in errors


def test_an_empty_folder_and_an_empty_index_are_said(tmp_path, capsys):
    """A folder with no image files (a wrong path, the wrong level) makes an empty index: said, not silent;
    so is a search of it."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("no images here")
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(tmp_path / "notes"), "--index", ix]) == 0
    assert "found no images in" in capsys.readouterr().err
    assert main(["search", "a red circle", "--index", ix]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "is empty: index a folder of images into it first" in captured.err
    (tmp_path / "data" / "train").mkdir(parents=True)  # shards a level down, no image: those shards indexed
    from clipkit.data.synthetic import write_synthetic

    made = write_synthetic(tmp_path / "made", 10, seed=1, split="test", maxcount=10, workers=1, progress=False)
    shutil.copy(made[0], tmp_path / "data" / "train" / "0.tar")
    assert main(["-q", "index", str(tmp_path / "data"), "--index", ix]) == 0
    assert len(Index.load(ix)) == 10 and "found no images" not in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "cover.jpg")  # an image beside them: a folder of images,
    assert main(["index", str(tmp_path / "data"), "--index", str(tmp_path / "ix2")]) == 0  # and the shards
    said = "".join(capsys.readouterr())  # below are said, with how to give them
    assert f"holds 1 webdataset shard(s) ({tmp_path / 'data' / 'train' / '0.tar'})" in said and "as SOURCE" in said


def test_a_pattern_as_source_says_to_give_the_folder(tmp_path, capsys):
    """`clipkit index 'photos/*.jpg'` said "folder not found"; unquoted, the shell's 200 file names made one
    screen-filling line of "unrecognized arguments". Both now say to give the folder."""
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [str(photos / f"{n}.jpg") for n in range(8)]
    assert main(["index", str(photos / "*.jpg"), "--index", str(tmp_path / "ix")]) == 2
    assert "is a pattern: give the folder" in capsys.readouterr().err
    assert main(["index", *names, "--index", str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and "give their folder" in err and names[-1] not in err
    assert not (tmp_path / "ix").exists()


def test_a_folder_taken_for_an_index_says_what_it_holds(tmp_path, capsys):
    """`clipkit search q --index photos` (the photos, not their index) said only "not a clipkit index"; now it
    says what the folder holds and the command that indexes it."""
    photos, shards, emb = tmp_path / "photos", tmp_path / "shards", tmp_path / "emb"
    for folder in (photos, shards, emb / "img_emb"):
        folder.mkdir(parents=True)
    (photos / "cat.jpg").write_bytes(b"")
    (shards / "train-000000.tar").write_bytes(b"")
    np.save(emb / "img_emb" / "img_emb_0.npy", np.zeros((2, 4), np.float16))
    for folder, says in ((photos, "it is a folder of images"), (shards, "it holds webdataset shards"),
                         (emb, "it holds embeddings in clip-retrieval's layout")):
        assert main(["info", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "is not a clipkit index" in err and says in err and f"clipkit index {folder}" in err.replace("'", "")
    from clipkit.index.lock import writer_lock

    stopped = tmp_path / "stopped"  # a first `clipkit index` into it killed before its first batch: its lock alone
    stopped.mkdir()
    with writer_lock(stopped):
        pass
    assert main(["search", "a cat", "--index", str(stopped)]) == 2
    assert "nothing was written there yet" in capsys.readouterr().err


def test_long_work_prints_a_progress_line_a_minute_into_a_log(tmp_path):
    """With stderr a file or a pipe (nohup, cron, a container's log) tqdm's bars were off, so a day-long run said
    nothing until it ended; now a line every CLIPKIT_PROGRESS_SECONDS (60), and none for work shorter than
    that, nor with -q."""
    def start(*argv, seconds=None) -> subprocess.Popen:
        env = {**os.environ, **({"CLIPKIT_PROGRESS_SECONDS": seconds} if seconds else {})}
        return subprocess.Popen([sys.executable, "-m", "clipkit", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def logged_by(process: subprocess.Popen) -> str:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        return err

    runs = [start("synth", str(tmp_path / "a"), "--n", "40", "--format", "folder", seconds="0"),
            start("synth", str(tmp_path / "b"), "--n", "40", "--format", "folder"),  # a short run
            start("-q", "synth", str(tmp_path / "c"), "--n", "40", "--format", "folder", seconds="0"),
            start("synth", str(tmp_path / "shards"), "--n", "40", "--shard-size", "10", "-q")]  # (side by side)
    logged, short, quiet, _ = [logged_by(process) for process in runs]
    assert "writing train: 100%" in logged and "40/40" in logged and "\r" not in logged
    assert "writing" not in short and "writing" not in quiet
    assert len([line for line in logged.splitlines() if "40/40" in line]) == 1  # the end said once
    logged = logged_by(start("index", str(tmp_path / "shards"), "--index", str(tmp_path / "ix"), "--batch-size", "4",
                             seconds="0"))
    counts = [line.split("|")[2].split("/")[0].strip() for line in logged.splitlines() if line.startswith("indexing")]
    assert len(set(counts)) > 2 and counts[-1] == "4"  # the shards' bar moves within the one call they share
    progress = [line for line in logged.splitlines() if not line.startswith("search it: ")]  # (a first index's hint)
    assert "40 img embedded" in progress[-1] and "search it: clipkit search" in logged.splitlines()[-1]
