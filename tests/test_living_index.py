"""The index as a living library: concurrent writers, a live server beside an indexer, moved folders,
disk full, read-only media, damaged files and extreme vectors. Cases about processes run real processes."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.errors import IndexBusyError, IndexFullError, ReadOnlyIndexError
from clipkit.index import CONFIG_FILE, DB_FILE, Index
from clipkit.index.persist import structure_files
from clipkit.index.lock import held_here, writer_lock

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipkit", *args]


def model_args(ckpt: Path, batch: int = 2) -> list[str]:
    return ["--model", "clipkit-tiny", "--pretrained", str(ckpt), "--batch-size", str(batch), "--workers", "1"]


def store_count(index_path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index_path / DB_FILE}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.Error:
        return 0


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_consistent(index_path: Path, expected_files: set[str]) -> Index:
    """Every file indexed once, and every item found by its own embedding (the FAISS file matches the store)."""
    index = Index.load(index_path)
    assert set(index.ids()) == expected_files and len(index) == len(expected_files)
    ids = index.ids()
    vectors = index.embeddings(ids)
    scores, found = index.search(vectors, 1)
    assert None not in found[:, 0].tolist() and np.allclose(scores[:, 0], 1, atol=1e-5)
    np.testing.assert_array_equal(index.embeddings(found[:, 0].tolist()), vectors)  # itself (or a same-file copy)
    return index


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("living")
    write_synthetic(root / "P", 300, seed=21, layout="folder", workers=1, progress=False)
    write_synthetic(root / "Q", 60, seed=22, layout="folder", workers=1, progress=False)
    return {"P": root / "P", "Q": root / "Q"}


def image_files(folder: Path) -> set[str]:
    return {str(p.resolve()) for p in folder.glob("*.jpg")}


# ---------------------------------------------------------------------------------------------
# One writer at a time


def test_two_overlapping_writers_wait_their_turn_and_leave_a_consistent_index(photos, tmp_path, tiny_ckpt):
    index_path = tmp_path / "ix.clipkit"
    runs = []
    for folder in ("P", "Q", "P"):  # started 0.5 s apart, as cron jobs that overlap would be
        runs.append(subprocess.Popen(cli("index", str(photos[folder]), "--index", str(index_path),
                                         *model_args(tiny_ckpt, 1)),
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.5)
    outputs = [p.communicate(timeout=300) for p in runs]
    for process, (out, err) in zip(runs, outputs):
        assert process.returncode == 0, err
    waited = [err for _, err in outputs if "waiting for the index" in err]
    assert len(waited) >= 2 and all("being written by pid" in err for err in waited)
    summaries = sorted(out for out, _ in outputs)
    assert any("indexed 300 image(s) (300 new" in out for out in summaries)
    assert any("indexed 60 image(s) (60 new" in out for out in summaries)
    assert any("indexed 0 image(s)" in out and "300 unchanged" in out for out in summaries)  # the same folder
    assert_consistent(index_path, image_files(photos["P"]) | image_files(photos["Q"]))
    check = subprocess.run(cli("index", str(photos["P"]), "--index", str(index_path), "--check"), env=ENV,
                           capture_output=True, text=True)
    assert "would embed 0 new and re-embed 0 changed" in check.stdout


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the index's writer lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from clipkit.index.lock import writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"), str(folder)],
        stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_no_wait_exits_2_naming_the_writer(photos, tmp_path, tiny_ckpt, capsys):
    index_path = tmp_path / "ix.clipkit"
    index_path.mkdir()
    holder = _hold_lock(index_path)
    try:
        code = main(["index", str(photos["Q"]), "--index", str(index_path), "--no-wait", *model_args(tiny_ckpt)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"being written by pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["-q", "index", str(photos["Q"]), "--index", str(index_path), "--no-wait",
                 *model_args(tiny_ckpt, 16)]) == 0


def test_writer_lock_is_reentrant_here_and_refuses_others(tmp_path):
    folder = tmp_path / "ix"
    folder.mkdir()
    with writer_lock(folder):
        with writer_lock(folder):
            assert held_here(folder)
        holder = subprocess.run([sys.executable, "-c", (
            "import sys; from clipkit.index.lock import writer_lock\n"
            "try:\n    with writer_lock(sys.argv[1], wait=False): pass\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)"), str(folder)],
            capture_output=True, text=True, env=ENV)
        assert holder.returncode == 3 and "IndexBusyError" in holder.stdout and str(os.getpid()) in holder.stdout
    assert not held_here(folder)
    other = _hold_lock(folder)
    try:
        with pytest.raises(IndexBusyError, match="still being written"):  # waited on, up to a timeout
            with writer_lock(folder, timeout=0.3):
                pass
    finally:
        other.kill()
        other.wait()
    with writer_lock(folder, wait=False):  # the kernel released the killed holder's lock
        pass


# ---------------------------------------------------------------------------------------------
# Live readers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_running_server_sees_what_an_indexer_commits(photos, tmp_path, tiny_ckpt):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    folder = tmp_path / "photos"
    shutil.copytree(photos["Q"], folder)
    index_path = tmp_path / "ix.clipkit"
    assert main(["-q", "index", str(folder), "--index", str(index_path), *model_args(tiny_ckpt, 16)]) == 0
    port = _free_port()
    server = subprocess.Popen(cli("-q", "serve", "--index", str(index_path), "--port", str(port), "--device", "cpu"),
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def items() -> int | None:
        try:
            return httpx.get(url + "healthz", timeout=2).json()["indexes"]["ix"]["items"]
        except httpx.HTTPError:
            assert server.poll() is None, server.stdout.read().decode(errors="replace")[-2000:]
            return None

    try:
        wait_for(lambda: items() == 60, what="the server to start")
        for path in sorted(folder.glob("*.jpg"))[:20]:  # 20 re-embedded (new content), 40 new files
            shutil.copy(photos["P"] / path.name.replace("train-0000000", "train-0000001"), path)
        for path in sorted(photos["P"].glob("*.jpg"))[:40]:
            shutil.copy(path, folder / ("new-" + path.name))
        assert main(["-q", "index", str(folder), "--index", str(index_path), *model_args(tiny_ckpt, 16)]) == 0
        wait_for(lambda: items() == 100, timeout=10, what="the server to see the new items")
        every = httpx.post(url + "search", json={"embedding": unit(1, 64, 0)[0].tolist(), "k": 1000}).json()
        assert len(every["results"]) == 100
        assert {r["path"] for r in every["results"]} == image_files(folder)
        changed = sorted(folder.glob("*.jpg"))[0]
        import base64

        body = {"image": base64.b64encode(changed.read_bytes()).decode(), "k": 1}
        hits = httpx.post(url + "search", json=body).json()["results"]
        assert hits and hits[0]["path"] == str(changed.resolve())
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_loaded_index_catches_up_with_another_writer(tmp_path):
    base = unit(200, 16, 0)
    writer = Index.from_embeddings(base[:100], ids=list(range(100)))
    writer.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix")
    reader.refresh_interval = 0
    writer.add(base[100:], ids=list(range(100, 200)))
    writer.remove(list(range(10)))
    assert len(reader) == 190  # no save needed: the store is the truth
    _, found = reader.search(base, 1)
    assert found[10:, 0].tolist() == list(range(10, 200))
    for index_type in ("IVF4,Flat", "HNSW8"):  # a writer that changes the structure
        writer.set_index_type(index_type)
        writer.save()
        reader.refresh()
        assert reader.structure == writer.structure
        assert reader.search(base[10:20], 1)[1][:, 0].tolist() == list(range(10, 20))



def test_a_search_between_looks_at_the_store_still_returns_k_hits(tmp_path):
    """A reader looks at the store at most every refresh_interval; a hit removed (or moved) by a writer in
    between has no record, and was dropped: k=1 could return nothing. Now it catches up and searches again."""
    import clipkit

    base = unit(50, 16, 3)
    writer = Index.from_embeddings(base, ids=[f"item-{n}" for n in range(50)])
    writer.save(tmp_path / "ix")
    reader = Index.load(tmp_path / "ix")
    reader.refresh_interval = 3600  # it never looks by itself during this test
    assert [h.id for h in clipkit.search(base[7], reader, k=1)] == ["item-7"]
    writer.remove(["item-7"])
    writer.add(base[7][None, :], ids=["moved-7"])  # the same image under a new id (a moved file)
    hits = clipkit.search(base[7], reader, k=3)
    assert [h.id for h in hits][:1] == ["moved-7"] and len(hits) == 3 and "item-7" not in [h.id for h in hits]
    writer.remove(["moved-7"])
    assert None not in reader.search(base[7:8], 3)[1][0].tolist()  # the raw batch search too (it gave None)


# ---------------------------------------------------------------------------------------------
# Roots and moves


def test_a_moved_folder_is_repointed_not_embedded_again(photos, tmp_path, tiny_ckpt, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(photos["Q"], folder)
    index_path = tmp_path / "ix.clipkit"
    assert main(["-q", "index", str(folder), "--index", str(index_path), *model_args(tiny_ckpt, 16)]) == 0
    before = Index.load(index_path)
    vectors = before.embeddings(sorted(image_files(folder)))
    renamed = tmp_path / "elsewhere" / "renamed"
    renamed.parent.mkdir()
    folder.rename(renamed)
    assert main(["index", str(renamed), "--index", str(index_path), *model_args(tiny_ckpt, 16)]) == 0
    out = capsys.readouterr().out
    assert "indexed 0 image(s) (0 new, 0 changed), 60 moved" in out
    after = assert_consistent(index_path, image_files(renamed))
    np.testing.assert_array_equal(after.embeddings(sorted(image_files(renamed))), vectors)
    assert [r["path"] for r in after.roots()] == [str(renamed.resolve())]
    assert main(["roots", str(index_path)]) == 0  # (INDEX, as `clipkit info` takes it, or --index INDEX)
    assert str(renamed.resolve()) in capsys.readouterr().out
    after.add(np.eye(2, after.dim, dtype=np.float32), ids=["x", "y"])
    assert main(["roots", "--index", str(index_path)]) == 0
    assert "       2  items of no indexed folder" in capsys.readouterr().out
    assert main(["-q", "remove", str(renamed), "--index", str(index_path)]) == 0 and after.remove(["x", "y"]) == 2
    assert main(["roots", "--index", str(index_path)]) == 0
    captured = capsys.readouterr()
    assert not captured.out and f"no folder is indexed in {index_path}: it is empty" in captured.err


def test_a_move_is_known_by_name_size_and_mtime_without_reading_the_files_and_a_copy_by_its_content(
        tmp_path, tiny_model, monkeypatch):
    """A renamed folder's files keep their names, sizes and mtimes: they are matched on those, no file is
    read (a folder of a million photos is not hashed). A file renamed inside it, or copied (a new mtime) with
    the original deleted, is matched by its content hash; items that have none (added through the API by
    path) still move by name."""
    import clipkit
    import clipkit.index.sync as sync
    from tests.conftest import shape_folder

    folder = shape_folder(tmp_path / "photos", 5)
    index = Index(tiny_model.dim, model=tiny_model)
    index.sync_folder(folder, tiny_model)
    vectors = {p.name: v for p, v in zip(sorted(folder.glob("*.png")),
                                          index.embeddings([str(p.resolve()) for p in sorted(folder.glob("*.png"))]))}
    folder.rename(tmp_path / "renamed")
    with monkeypatch.context() as patch:
        patch.setattr(sync, "hash_or_none", lambda path: pytest.fail(f"{path} was read"))
        report = index.sync_folder(tmp_path / "renamed", tiny_model)
    assert (report.moved, report.added) == (5, 0)
    renamed = tmp_path / "renamed"
    (renamed / "0.png").rename(renamed / "zero.png")  # renamed: another name
    shutil.copyfile(renamed / "1.png", renamed / "one.png")  # copied: another mtime
    (renamed / "1.png").unlink()
    os.utime(renamed / "one.png", (1e9, 1e9))
    report = index.sync_folder(renamed, tiny_model)
    assert (report.moved, report.added, report.removed, report.unchanged) == (2, 0, 0, 3)
    np.testing.assert_allclose(index.embeddings([str((renamed / n).resolve()) for n in ("zero.png", "one.png")]),
                               [vectors["0.png"], vectors["1.png"]], atol=1e-6)

    files = sorted(str(p.resolve()) for p in renamed.glob("*.png"))
    bare = Index.from_embeddings(clipkit.encode([Path(f) for f in files], model=tiny_model), ids=files, metadata=[
        {"path": f, "size": os.stat(f).st_size, "mtime": os.stat(f).st_mtime} for f in files])  # no content hash
    bare.sync_folder(renamed, tiny_model)
    renamed.rename(tmp_path / "again")
    report = bare.sync_folder(tmp_path / "again", tiny_model)
    assert (report.moved, report.added) == (5, 0)


def _eof():
    raise EOFError


def test_items_of_a_folder_that_is_gone_can_be_dropped(photos, tmp_path, tiny_ckpt, capsys, monkeypatch):
    for name in ("a", "b"):
        shutil.copytree(photos["Q"], tmp_path / name / "photos", ignore=shutil.ignore_patterns(
            "*1.jpg" if name == "a" else "*2.jpg"))
    index_path = tmp_path / "ix.clipkit"
    for name in ("a", "b"):
        assert main(["-q", "index", str(tmp_path / name), "--index", str(index_path),
                     *model_args(tiny_ckpt, 16)]) == 0
    a_files, b_files = image_files(tmp_path / "a" / "photos"), image_files(tmp_path / "b" / "photos")
    assert_consistent(index_path, a_files | b_files)
    shutil.rmtree(tmp_path / "a")
    assert main(["index", str(tmp_path / "b"), "--index", str(index_path), *model_args(tiny_ckpt, 16)]) == 0
    err = capsys.readouterr().err
    assert f"{len(a_files)} item(s) of {(tmp_path / 'a').resolve()}, which no longer exists" in err  # pointed out
    assert main(["remove", "--missing", "--index", str(index_path)]) == 0
    assert f"removed {len(a_files)} item(s)" in capsys.readouterr().out
    assert_consistent(index_path, b_files)
    answers = []  # at a terminal, PATHs that hold every item are asked about first ("n", or no answer: kept)
    monkeypatch.setattr(sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})("n\n"))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda: answers.pop(0) if answers else sys.stdin.readline() or _eof())
    assert main(["remove", str(tmp_path), "--index", str(index_path)]) == 1  # "n"
    assert main(["remove", "/", "--index", str(index_path)]) == 1  # Ctrl-D
    assert "drop them all?" in capsys.readouterr().err and len(Index.load(index_path)) == len(b_files)
    shutil.copytree(index_path, tmp_path / "copy.clipkit")
    answers.append("y")
    assert main(["-q", "remove", str(tmp_path), "--index", str(tmp_path / "copy.clipkit")]) == 0
    assert not answers and len(Index.load(tmp_path / "copy.clipkit")) == 0
    assert main(["remove", str(tmp_path / "b" / "photos"), str(tmp_path / "typo"), "--index", str(index_path)]) == 0
    assert len(Index.load(index_path)) == 0
    out = capsys.readouterr().out
    assert f"(nothing indexed at or under {tmp_path / 'typo'})" in out  # a path that matched nothing
    assert f"still on disk: {tmp_path / 'b' / 'photos'}; the next `clipkit index`" in out  # it would come back
    assert main(["remove", "--index", str(index_path)]) == 2  # nothing named: a usage error


def test_removing_every_shard_of_an_index_is_asked_about_too(tmp_path, tiny_ckpt, capsys, monkeypatch):
    from clipkit.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "shards", 12, seed=2, size=32, maxcount=4, workers=1, progress=False)
    index_path = tmp_path / "ix.clipkit"
    assert main(["-q", "index", str(tmp_path / "shards"), "--index", str(index_path), *model_args(tiny_ckpt)]) == 0
    assert len(Index.load(index_path)) == 12
    monkeypatch.setattr(sys, "stdin", type("Terminal", (io.StringIO,), {"isatty": lambda self: True})("n\nn\n"))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda: sys.stdin.readline() or _eof())
    assert main(["remove", str(tmp_path), "--index", str(index_path)]) == 1  # every shard's items: asked, "n"
    assert "hold(s) all 12 items" in capsys.readouterr().err and len(Index.load(index_path)) == 12
    assert main(["-q", "remove", str(tmp_path / "shards" / "train-000000.tar"), "--index", str(index_path)]) == 0
    assert "drop them all?" not in capsys.readouterr().err and len(Index.load(index_path)) == 8  # a part: not asked


def test_indexing_a_parent_folder_adopts_its_indexed_subfolder(tmp_path, tiny_model):
    from tests.conftest import draw_shape

    (tmp_path / "all" / "sub").mkdir(parents=True)
    for i in range(3):
        draw_shape("red", "circle", seed=i).save(tmp_path / "all" / "sub" / f"{i}.png")
        draw_shape("blue", "square", seed=i).save(tmp_path / "all" / f"{i}.png")
    index = Index(tiny_model.dim, model=tiny_model)
    assert index.sync_folder(tmp_path / "all" / "sub", tiny_model).added == 3
    report = index.sync_folder(tmp_path / "all", tiny_model)
    assert (report.added, report.unchanged) == (3, 3)
    assert [r["path"] for r in index.roots()] == [str((tmp_path / "all").resolve())]
    assert index.sync_folder(tmp_path / "all" / "sub", tiny_model).unchanged == 3  # inside a root: still known


def test_files_added_by_path_are_adopted_by_their_folder_s_first_sync(tmp_path, tiny_model):
    """Items added through the API with their files' paths (as an ingest of embeddings names them) are the
    folder's files once it is indexed: kept, not embedded again, stored relative to it (so that moving the
    folder re-points them); one statement re-roots them, however many there are."""
    import clipkit
    from clipkit.index.sync import file_hash
    from tests.conftest import draw_shape

    (tmp_path / "all" / "sub").mkdir(parents=True)
    files = []
    for i in range(3):
        for folder, colour in ((tmp_path / "all", "red"), (tmp_path / "all" / "sub", "blue")):
            draw_shape(colour, "circle", seed=i).save(folder / f"{i}.png")
            files.append(str((folder / f"{i}.png").resolve()))
    vectors = clipkit.encode([Path(f) for f in files], model=tiny_model)
    index = Index.from_embeddings(vectors, ids=files, metadata=[
        {"path": f, "size": os.stat(f).st_size, "mtime": os.stat(f).st_mtime, "content_hash": file_hash(f)}
        for f in files])
    report = index.sync_folder(tmp_path / "all", tiny_model)
    assert (report.added, report.updated, report.unchanged) == (0, 0, 6)
    stored = dict(index.store.db.execute("SELECT id, path FROM items WHERE root IS NOT NULL").fetchall())
    assert stored == {f: Path(f).relative_to((tmp_path / "all").resolve()).as_posix() for f in files}
    assert [r["path"] for r in index.get(files)] == files
    (tmp_path / "all").rename(tmp_path / "moved")
    report = index.sync_folder(tmp_path / "moved", tiny_model)
    assert (report.added, report.moved) == (0, 6)
    np.testing.assert_allclose(index.embeddings([f.replace("/all/", "/moved/") for f in files]), vectors, atol=1e-6)


def test_format_1_index_is_migrated_and_its_files_stay_known(tmp_path, tiny_model):
    from tests.conftest import shape_folder

    photos = shape_folder(tmp_path / "photos", 4, "green", "triangle")
    current = Index(tiny_model.dim, model=tiny_model)
    current.sync_folder(photos, tiny_model)
    records = current.get(current.ids())
    old = tmp_path / "old.clipkit"
    old.mkdir()
    with sqlite3.connect(old / DB_FILE) as db:  # the version 1 layout: absolute paths, no roots
        db.executescript("CREATE TABLE items (key INTEGER PRIMARY KEY, id UNIQUE NOT NULL, path TEXT, mtime REAL, "
                         "size INTEGER, caption TEXT, extra TEXT, embedding BLOB NOT NULL);"
                         "CREATE TABLE info (name TEXT PRIMARY KEY, value TEXT NOT NULL);")
        for key, record in enumerate(records):
            db.execute("INSERT INTO items VALUES (?,?,?,?,?,?,?,?)", (
                key, record["id"], record["path"], record["mtime"], record["size"], None,
                json.dumps({"content_hash": record["content_hash"]}), current.embeddings([record["id"]])[0].tobytes()))
        for name, value in (("format", "clipkit-index"), ("format_version", 1), ("dim", 64),
                            ("model", tiny_model.info), ("generation", 5), ("index_type", "flat")):
            db.execute("INSERT INTO info VALUES (?, ?)", (name, json.dumps(value)))
    migrated = Index.load(old)
    assert migrated.store.info("format_version") == 4 and len(migrated) == 4
    np.testing.assert_array_equal(migrated.embeddings(migrated.ids()), current.embeddings(migrated.ids()))
    assert migrated.get(migrated.ids()) == records
    report = migrated.sync_folder(photos, tiny_model)
    assert (report.unchanged, report.embedded) == (4, 0)
    assert [r["items"] for r in migrated.roots()] == [4]
    assert migrated.get(migrated.ids()) == records  # paths now relative to the root, read back the same


# ---------------------------------------------------------------------------------------------
# Faults


def _tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    import gc

    gc.collect()  # close what this process still holds open there
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_exits_2_keeps_what_was_committed_and_resumes(photos, tmp_path, tiny_ckpt):
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "160k"):
        pytest.skip("needs root and tmpfs mounts (the injected-ENOSPC test covers this elsewhere)")
    try:
        index_path = disk / "ix.clipkit"
        command = cli("index", str(photos["P"]), "--index", str(index_path), *model_args(tiny_ckpt, 16))
        full = subprocess.run(command, env=ENV, capture_output=True, text=True)
        assert full.returncode == 2 and "no space left" in full.stderr, full.stderr
        assert full.stderr.count("\n") == 1 and "Traceback" not in full.stderr
        kept = Index.load(index_path)
        committed = len(kept)
        assert 0 < committed < 300
        ids = kept.ids()
        assert kept.search(kept.embeddings(ids), 1)[1][:, 0].tolist() == ids
        kept.close()
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        done = subprocess.run(command, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"({300 - committed} new" in done.stdout
        assert_consistent(index_path, image_files(photos["P"]))
    finally:
        _unmount(disk)


def test_a_full_temporary_folder_is_named_and_changes_nothing(photos, tmp_path, tiny_ckpt, monkeypatch):
    """A folder's plan and a table's rows go to a private database in the temporary folder: when that fills
    up, the error names it and says how to choose another (not "the disk holding the index"), one line, exit
    2, and the index keeps what it had. Skipped files spilled there too fail the same way (injected ENOSPC)."""
    import errno

    from clipkit._io import SpillList
    from clipkit.errors import TempFullError

    index_path = tmp_path / "ix.clipkit"
    folder = tmp_path / "photos"
    shutil.copytree(photos["Q"], folder)
    assert subprocess.run(cli("-q", "index", str(folder), "--index", str(index_path), *model_args(tiny_ckpt, 16)),
                          env=ENV).returncode == 0
    for i in range(3000):
        (folder / f"not_an_image_{i:05d}_with_a_long_name_that_fills_the_plan.jpg").write_bytes(b"x")
    table = tmp_path / "table.csv"
    table.write_text("image,caption\n" + "".join(f"photos/{i:05d}_with_a_long_name_that_fills_the_rows.jpg,a cat\n"
                                                 for i in range(30_000)))  # (past SQLite's page cache)
    temp = tmp_path / "temp"
    mounted = _tmpfs(temp, "64k")
    if not mounted:  # (without root: SQLite's own error, injected)
        temp.mkdir()
        for where in ("clipkit.index.sync._insert_found", "clipkit.data.tables.batches"):
            monkeypatch.setattr(where, lambda *a: _raise(sqlite3.OperationalError("database or disk is full")))
    try:
        for source in (folder, table):
            command = cli("index", str(source), "--index", str(index_path), *model_args(tiny_ckpt, 16))
            if mounted:
                run = subprocess.run(command, env={**_without_sqlite_tmpdir(), "TMPDIR": str(temp)},
                                     capture_output=True, text=True)
                code, err = run.returncode, run.stderr
            else:
                code, err = _in_process(command[3:], monkeypatch, temp)
            assert code == 2 and err.count("\n") == 1, err
            assert f"no space left in the temporary folder {temp}" in err and "set TMPDIR" in err, err
            assert len(Index.load(index_path)) == 60
    finally:
        if mounted:
            _unmount(temp)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    spill = SpillList(kept=2)
    spill.extend(["a", "b"])
    monkeypatch.setattr("tempfile.TemporaryFile", no_space)
    with pytest.raises(TempFullError, match="no space left in the temporary folder"):
        spill.append("c")


def _raise(exc: BaseException):
    raise exc


def _without_sqlite_tmpdir() -> dict:
    return {name: value for name, value in ENV.items() if name != "SQLITE_TMPDIR"}


WHERE_SQLITE_WRITES = """
import os, sqlite3
from clipkit._io import sqlite_temp_folder
db = sqlite3.connect("")  # a private temporary database: on disk once it outgrows its page cache
db.executescript("PRAGMA cache_size = 2; CREATE TABLE t (x TEXT);")
db.executemany("INSERT INTO t VALUES (?)", (("x" * 500,) for _ in range(2000)))
links = []
for fd in os.listdir("/proc/self/fd"):
    try:
        links.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # (the listing's own, closed since)
        pass
print(sorted({os.path.dirname(link) for link in links if "etilqs_" in link}), sqlite_temp_folder())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads where SQLite's file is from /proc")
def test_the_temporary_folder_said_full_is_where_sqlite_writes(tmp_path):
    """SQLite's private databases (a folder's plan, a table's rows) go to $SQLITE_TMPDIR, $TMPDIR, then /var/tmp
    before /tmp (Python's tempfile tries /tmp first): the folder a full-temporary-space error names is the one
    SQLite wrote to, read from the process's open files."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    bare = {name: value for name, value in _without_sqlite_tmpdir().items() if name not in ("TMPDIR", "TEMP", "TMP")}
    for env in (bare, {**bare, "TMPDIR": str(tmp_path / "a")},
                {**bare, "TMPDIR": str(tmp_path / "a"), "SQLITE_TMPDIR": str(tmp_path / "b")}):
        out = subprocess.run([sys.executable, "-c", WHERE_SQLITE_WRITES], env=env, capture_output=True, text=True,
                             check=True).stdout.rsplit(" ", 1)
        assert out[0] == repr([out[1].strip()]), out  # (the first case: /var/tmp on most systems)


def _in_process(args: list[str], monkeypatch, temp: Path) -> tuple[int, str]:
    """(exit code, stderr) of `clipkit ARGS` run in this process, with TMPDIR at `temp`."""
    import contextlib
    import io

    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    return code, err.getvalue()


def test_disk_full_injected(tmp_path, monkeypatch):
    import errno

    index = Index.from_embeddings(unit(50, 8, 0))
    index.save(tmp_path / "ix")
    from clipkit.index import store as store_module

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store_module.Store, "insert", full)
    with pytest.raises(IndexFullError, match="no space left"):
        index.add(unit(5, 8, 1), ids=list(range(50, 55)))
    monkeypatch.undo()
    assert len(index) == 50 and len(Index.load(tmp_path / "ix")) == 50

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    from clipkit.index import persist

    monkeypatch.setattr(persist, "atomic_write_json", no_space)
    index.add(unit(5, 8, 1), ids=list(range(50, 55)))  # committed to the store
    with pytest.raises(IndexFullError):
        index.save()
    monkeypatch.undo()
    assert len(Index.load(tmp_path / "ix")) == 55  # the stale FAISS file is not trusted: rebuilt from the store
    assert main(["remove", "--index", str(tmp_path / "ix"), "--missing"]) == 0


def test_read_only_index_searches_and_refuses_writes(photos, tmp_path, tiny_ckpt, capsys):
    media = tmp_path / "media"
    mounted = _tmpfs(media, "8m")
    try:
        index_path = media / "ix.clipkit"
        subprocess.run(cli("-q", "index", str(photos["Q"]), "--index", str(index_path), *model_args(tiny_ckpt, 16)),
                       env=ENV, check=True)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        elif os.geteuid() == 0:
            pytest.skip("read-only media needs a mount when the tests run as root")
        else:
            for path in [index_path, *index_path.iterdir()]:
                path.chmod(0o555 if path.is_dir() else 0o444)
        index = Index.load(index_path)
        assert index.readonly and len(index) == 60
        assert main(["search", "a red circle", "--index", str(index_path), "-k", "3"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 3
        with pytest.raises(ReadOnlyIndexError, match="read-only"):
            index.add(unit(1, 64, 0), ids=["x"])
        assert main(["index", str(photos["Q"]), "--index", str(index_path), *model_args(tiny_ckpt)]) == 2
        assert "read-only" in capsys.readouterr().err
        index.close()
    finally:
        if mounted:
            _unmount(media)
        elif index_path.exists():
            for path in [index_path, *index_path.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)


def test_flipped_bytes_in_the_faiss_file_are_detected_and_rebuilt(tmp_path, caplog):
    base = unit(500, 32, 0)
    Index.from_embeddings(base, index_type="IVF4,Flat", precision="float32").save(tmp_path / "ix")  # (exact search
    # keeps no FAISS file)
    faiss_file = structure_files(tmp_path / "ix")["faiss"]
    data = bytearray(faiss_file.read_bytes())
    for position in range(len(data) - 400, len(data) - 300):  # inside the vectors: same size, wrong values
        data[position] ^= 0x5A
    faiss_file.write_bytes(bytes(data))
    loaded = Index.load(tmp_path / "ix")
    assert "does not match the store" in caplog.text
    scores, ids = loaded.search(base[:50], 1)
    assert ids[:, 0].tolist() == list(range(50)) and np.allclose(scores[:, 0], 1, atol=1e-5)


def test_a_faiss_file_saved_for_another_key_set_is_not_trusted(tmp_path, caplog):
    """What two unlocked writers used to leave: the right generation and count, other keys."""
    base = unit(61, 8, 0)
    index = Index.from_embeddings(base[:60], index_type="IVF1,Flat")
    index.save(tmp_path / "ix")
    files = [tmp_path / "ix" / CONFIG_FILE, *structure_files(tmp_path / "ix").values()]
    saved = {file: file.read_bytes() for file in files}
    index.remove([0])
    index.add(base[60:], ids=[60])  # the same count, another key set
    config = json.loads(saved[files[0]])
    config["faiss_generation"], config["faiss_last_key"] = index.generation, 60
    for file in files:
        file.write_bytes(saved[file])
    (tmp_path / "ix" / CONFIG_FILE).write_text(json.dumps(config))
    loaded = Index.load(tmp_path / "ix")
    assert "does not match the store" in caplog.text
    assert loaded.search(base[60], 1)[1][0, 0] == 60 and loaded.search(base[0], 1)[1][0, 0] != 0


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30, 1e300])
def test_huge_and_tiny_vectors_keep_their_direction(scale):
    base = unit(10, 8, 0)
    index = Index.from_embeddings(base.astype(np.float64) * scale)
    np.testing.assert_allclose(index.embeddings(), base, atol=1e-6)
    scores, ids = index.search(base[3].astype(np.float64) * scale, 1)
    assert ids[0, 0] == 3 and abs(scores[0, 0] - 1) < 1e-5


@pytest.mark.parametrize("bad", [np.inf, np.nan, 0.0])
def test_non_finite_and_zero_vectors_are_refused(bad):
    vectors = unit(3, 8, 0).astype(np.float64)
    vectors[1] = bad if bad != 0 else 0
    with pytest.raises(ValueError, match="NaN or infinite|all-zero"):
        Index.from_embeddings(vectors)


def test_server_answers_4xx_never_5xx_to_extreme_vectors(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    base = unit(30, 8, 0)
    index = Index.from_embeddings(base, metadata=[{"caption": f"item {i}"} for i in range(30)])

    class Stub:  # no model is needed for vector queries; the server still wants one to describe
        name, device, fingerprint, itm, dim, image_size = "stub", "cpu", None, None, 8, 32

    index.model = Stub()
    client = TestClient(create_app(index, model=None))
    ok = client.post("/search", json={"embedding": (base[4] * 1e30).tolist(), "k": 1})
    assert ok.status_code == 200 and ok.json()["results"][0]["item_id"] == 4
    knn = client.post("/knn-service", json={"embedding_input": (base[5].astype(np.float64) * 1e39).tolist(), "num_images": 1})
    assert knn.status_code == 200 and knn.json()[0]["caption"] == "item 5"
    raw = '{"embedding": [1e400, 0, 0, 0, 0, 0, 0, 0], "k": 1}'
    for route, body in (("/search", raw), ("/search", raw.replace("1e400", "NaN")),
                        ("/knn-service", raw.replace("embedding", "embedding_input")),
                        ("/search", '{"embedding": [0, 0, 0, 0, 0, 0, 0, 0]}'),
                        ("/search", '{"embedding": [1, 2], "k": 1}')):
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert 400 <= response.status_code < 500, (route, body, response.text)
        assert response.json()["detail"]
