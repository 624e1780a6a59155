"""The doors hostile testing found open (issue "every door"): each case as a user or an attacker meets it, with
real files, real processes and real HTTP."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.data.synthetic import write_synthetic
from clipkit.index import Index

from conftest import RERANK_ATOL, draw_shape


@pytest.fixture(scope="module")
def demo():
    return clipkit.load_model("clipkit-demo", device="cpu")


def three_photos(root: Path, captions: bool = False) -> Path:
    """root/photos with 0.png, 1.png, 2.png (a red circle, a blue square, a green triangle), and with
    `captions` a NAME.txt caption beside each."""
    photos = root / "photos"
    photos.mkdir()
    for n, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        draw_shape(colour, shape, seed=n).save(photos / f"{n}.png")
        if captions:
            (photos / f"{n}.txt").write_text(f"a {colour} {shape}\n")
    return photos


# -- data lost ---------------------------------------------------------------------------------


def test_folder_sync_keeps_the_captions_of_shards_inside_it(tmp_path, demo, capsys):
    mix = tmp_path / "mix"
    shards = write_synthetic(mix / "shards", 10, seed=3, split="test", maxcount=10, workers=1, progress=False)
    draw_shape("red", "circle").save(mix / "photo.png")
    (mix / "photo.txt").write_text("a red circle\n")
    ix = str(tmp_path / "ix")
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    before = sorted(Index.load(ix).captions.ids())
    assert len(before) >= 10
    capsys.readouterr()
    assert main(["index", str(mix), "--index", ix]) == 0
    out = capsys.readouterr().out
    assert "captions: 1 embedded" in out and ", 0 removed" in out, out
    index = Index.load(ix)
    assert sorted(set(index.captions.ids()) - {f"{mix / 'photo.png'}#0"}) == before
    assert main(["remove", str(mix / "photo.png"), "--index", ix]) == 0  # the folder's own captions still follow
    assert sorted(Index.load(ix).captions.ids()) == before


def test_shard_captions_lost_by_an_older_folder_sync_come_back(tmp_path, demo, capsys):
    shards = write_synthetic(tmp_path / "shards", 10, seed=3, split="test", maxcount=10, workers=1, progress=False)
    ix = str(tmp_path / "ix")
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    index = Index.load(ix)
    expected = sorted(index.captions.ids())
    index.captions.remove(expected)  # what clipkit 0.x's folder sync did to them
    assert main(["index", str(shards[0]), "--index", ix]) == 0
    assert "indexed 0 image(s)" in capsys.readouterr().out  # nothing embedded again
    assert sorted(Index.load(ix).captions.ids()) == expected


def _committed_wal_index(path: Path) -> None:
    """An index at `path` whose last commits sit in a non-empty meta.sqlite-wal (its writer was killed)."""
    script = ("import os, sys, numpy as np\n"
              "from clipkit.index import Index\n"
              "vectors = np.random.default_rng(0).normal(size=(2003, 16))\n"
              "index = Index.from_embeddings(vectors[:2000], ids=[f'old{i}' for i in range(2000)])\n"
              "index.save(sys.argv[1])\n"
              "index.add(vectors[2000:], ids=[f'old{i}' for i in range(2000, 2003)])\n"
              "os._exit(0)  # no close: the commits stay in the WAL\n")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert (path / "meta.sqlite-wal").stat().st_size > 0


def test_save_over_an_index_with_a_wal_never_splices_two_stores(tmp_path):
    """A crash after the new store is renamed in but before the old WAL is gone must not let SQLite replay
    the old WAL onto the new file: the old WAL is folded (or gone) before the new store takes the name."""
    target = tmp_path / "ix"
    _committed_wal_index(target)
    script = (
        "import os, sys, numpy as np\n"
        "import clipkit.index.persist as persist\n"
        "from clipkit.index import Index\n"
        "real = persist.atomic_path\n"
        "import contextlib\n"
        "@contextlib.contextmanager\n"
        "def dying(target):\n"
        "    with real(target) as tmp:\n"
        "        yield tmp\n"
        "    os._exit(9)  # killed right after the new store took the name\n"
        "persist.atomic_path = dying\n"
        "vectors = np.random.default_rng(1).normal(size=(1500, 16))\n"
        "Index.from_embeddings(vectors, ids=[f'new{i}' for i in range(1500)]).save(sys.argv[1])\n")
    assert subprocess.run([sys.executable, "-c", script, str(target)]).returncode == 9
    db = sqlite3.connect(target / "meta.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    loaded = Index.load(target)
    ids = set(loaded.ids())
    assert ids in ({f"old{i}" for i in range(2003)}, {f"new{i}" for i in range(1500)}), len(ids)


# -- security ----------------------------------------------------------------------------------


@pytest.fixture
def served_folder(tmp_path, demo):
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    photos = three_photos(tmp_path)
    index = Index.from_folder(photos, demo)
    index.save(tmp_path / "ix")
    keys = dict(zip(index.ids(), index.keys(index.ids())))
    with TestClient(create_app(Index.load(tmp_path / "ix"))) as client:
        yield client, photos, {Path(i).name: k for i, k in keys.items()}


def test_image_route_serves_only_the_file_that_was_indexed(served_folder, tmp_path):
    client, photos, keys = served_folder
    original = (photos / "0.png").read_bytes()
    reply = client.get(f"/image/{keys['0.png']}")
    assert reply.status_code == 200 and reply.content == original and reply.headers["content-type"] == "image/png"
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (photos / "0.png").unlink()
    (photos / "0.png").symlink_to(secret)  # anyone who can write into the folder
    for route in ("image", "thumbnail"):
        reply = client.get(f"/{route}/{keys['0.png']}")
        assert reply.status_code == 404 and b"root:" not in reply.content, reply.content
        assert "cannot be served" in reply.json()["detail"]
    outside = tmp_path / "elsewhere.png"  # another image outside the folder: not served either
    outside.write_bytes(original)
    os.utime(outside, ns=(os.stat(secret).st_atime_ns, os.stat(secret).st_mtime_ns))
    (photos / "0.png").unlink()
    (photos / "0.png").symlink_to(outside)
    assert client.get(f"/image/{keys['0.png']}").status_code == 404
    stat = (photos / "1.png").stat()  # rewritten in place with the same size and mtime: decoded or refused
    (photos / "1.png").write_bytes(b"x" * stat.st_size)
    os.utime(photos / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert client.get(f"/image/{keys['1.png']}").status_code == 404
    assert client.get(f"/image/{keys['2.png']}").status_code == 200  # the others are served as before


def test_photos_reached_through_a_symlink_are_served_while_they_are_what_was_indexed(tmp_path, demo):
    """A library that links an album kept elsewhere (`photos/album -> /mnt/disk/album`) is indexed through the
    link; its images are served as long as their bytes are those indexed (their content hash), and refused once
    the file there is another, even one of the same size and mtime."""
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    photos, album = tmp_path / "photos", tmp_path / "disk" / "album"
    photos.mkdir()
    album.mkdir(parents=True)
    draw_shape("red", "circle").save(photos / "home.png")
    draw_shape("blue", "square").save(album / "trip.png")
    (photos / "album").symlink_to(album)
    Index.from_folder(photos, demo).save(tmp_path / "ix")
    index = Index.load(tmp_path / "ix")
    keys = {Path(i).name: k for i, k in zip(index.ids(), index.keys(index.ids()))}
    assert sorted(keys) == ["home.png", "trip.png"]
    with TestClient(create_app(index)) as client:
        for route in ("image", "thumbnail"):
            assert client.get(f"/{route}/{keys['trip.png']}").status_code == 200
        assert client.get(f"/image/{keys['trip.png']}").content == (album / "trip.png").read_bytes()
        stat = (album / "trip.png").stat()
        other = draw_shape("green", "triangle")  # another picture, same size and mtime
        other.save(album / "other.png")
        data = (album / "other.png").read_bytes()[:stat.st_size].ljust(stat.st_size, b"\0")
        (album / "trip.png").write_bytes(data)
        os.utime(album / "trip.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
        reply = client.get(f"/image/{keys['trip.png']}")
        assert reply.status_code == 404 and "other than the one indexed" in reply.json()["detail"]
        assert client.get(f"/image/{keys['home.png']}").status_code == 200


def test_iphone_avif_and_tiff_photos_are_indexed_and_served_as_browsers_show_them(tmp_path, demo, monkeypatch):
    """.heic/.heif (iPhones) and .avif files were passed over without a word; now they are indexed (HEIC through
    pillow-heif, clipkit[heif]) with the embeddings of their pixels, and /image serves what browsers cannot
    show (HEIC, TIFF) as a JPEG of it. Without pillow-heif a HEIC is skipped with what to install."""
    pytest.importorskip("pillow_heif")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from clipkit.data import images as images_module
    from clipkit.serve import create_app

    photos = tmp_path / "photos"
    photos.mkdir()
    drawn = {"a.heic": draw_shape("red", "circle", (80, 60)), "b.avif": draw_shape("blue", "square", (80, 60)),
             "c.tiff": draw_shape("green", "triangle", (80, 60))}
    for name, image in drawn.items():
        image.save(photos / name)
    index = Index.from_folder(photos, demo)
    index.save(tmp_path / "ix")
    ids = [str(photos / name) for name in drawn]
    assert sorted(index.ids()) == sorted(ids)
    decoded = [Image.open(photos / name).convert("RGB") for name in drawn]
    np.testing.assert_allclose(index.embeddings(ids), clipkit.encode(decoded, model=demo), atol=1e-5)
    keys = dict(zip(ids, index.keys(ids)))
    with TestClient(create_app(Index.load(tmp_path / "ix"))) as client:
        for name, media_type in (("a.heic", "image/jpeg"), ("b.avif", "image/avif"), ("c.tiff", "image/jpeg")):
            reply = client.get(f"/image/{keys[str(photos / name)]}")
            assert reply.status_code == 200 and reply.headers["content-type"] == media_type, name
            assert Image.open(io.BytesIO(reply.content)).size == (80, 60)
    monkeypatch.setattr(images_module, "HEIF_READABLE", False)  # as without pillow-heif
    (photos / "d.heic").write_bytes(b"not decodable here" * 20)
    report = Index.load(tmp_path / "ix").sync_folder(photos, demo)
    assert report.skipped and "pip install 'clipkit[heif]'" in report.skipped[0][1]


def test_image_route_refuses_a_rewritten_shard(tmp_path, demo):
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    shards = write_synthetic(tmp_path / "shards", 10, seed=3, split="test", maxcount=10, workers=1, progress=False)
    assert main(["-q", "index", str(shards[0]), "--index", str(tmp_path / "ix")]) == 0
    index = Index.load(tmp_path / "ix")
    key = index.keys(index.ids()[:1])[0]
    with TestClient(create_app(index)) as client:
        assert client.get(f"/image/{key}").status_code == 200
        secret = tmp_path / "secret.txt"
        secret.write_bytes(os.urandom(shards[0].stat().st_size))
        shards[0].unlink()
        shards[0].symlink_to(secret)
        assert client.get(f"/image/{key}").status_code == 404
        assert client.get(f"/thumbnail/{key}").status_code == 404


class _SlowServer:
    """An HTTP server on 127.0.0.1 that counts requests and answers as `handler(socket)` says."""

    def __init__(self, handler):
        import socket
        import threading

        self.requests, self.handler = 0, handler
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.recv(65536)
            self.handler(conn, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def _trickle(conn, stop, every=0.2, header=True):
    if header:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    else:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
    while not stop.wait(every):
        conn.sendall(b"x")


def test_image_url_connects_to_the_address_it_checked(monkeypatch):
    """DNS rebinding: the name answers a public address to the check and 127.0.0.1 afterwards."""
    import socket

    from clipkit.data import fetch

    server = _SlowServer(lambda conn, stop: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    answers = iter(["93.184.215.14"] + ["127.0.0.1"] * 10)
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    attempts = []

    def connect(address, port, timeout):  # never sends anything to the public address
        attempts.append((address, port))
        raise ConnectionRefusedError("refused (test)")

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    monkeypatch.setattr(fetch, "_connect", connect)
    try:
        with pytest.raises(fetch.FetchError, match="cannot fetch"):
            fetch.Fetcher(1000).fetch(f"http://rebind.example:{server.port}/a.jpg")
        assert attempts == [("93.184.215.14", server.port)] and server.requests == 0
    finally:
        server.close()


@pytest.mark.parametrize("header", [True, False], ids=["trickled-body", "trickled-headers"])
def test_image_url_fetch_has_a_total_deadline_and_a_bound(monkeypatch, header):
    import threading
    import time

    from clipkit.data import fetch

    monkeypatch.setattr(fetch, "_is_public", lambda address: True)  # the trickling server is on loopback
    server = _SlowServer(lambda conn, stop: _trickle(conn, stop, header=header))
    fetcher = fetch.Fetcher(10**6, deadline=1.0, concurrency=1)
    try:
        started = time.monotonic()
        with pytest.raises(fetch.FetchError, match="longer than 1 s"):
            fetcher.fetch(f"http://127.0.0.1:{server.port}/slow.jpg")
        assert time.monotonic() - started < 4  # the trickle alone would last 200 s
        running = threading.Thread(target=lambda: pytest.raises(fetch.FetchError, fetcher.fetch,
                                                                f"http://127.0.0.1:{server.port}/slow.jpg"))
        running.start()
        while server.requests < 2:
            time.sleep(0.01)
        with pytest.raises(fetch.FetchBusy):  # one fetch at a time here: the second is refused at once
            fetcher.fetch(f"http://127.0.0.1:{server.port}/other.jpg")
        running.join()
    finally:
        server.close()


@pytest.mark.parametrize("url, message", [
    ("http://user:secret@93.184.215.14:8080/a.jpg", "user name or password"),
    ("http://93.184.215.14:99999/a.jpg", "invalid port"), ("gopher://93.184.215.14/a", "http or https"),
])
def test_image_url_forms_refused_with_a_message(url, message):
    from clipkit.data.fetch import FetchError, Fetcher

    with pytest.raises(FetchError, match=message):
        Fetcher(1000).fetch(url)


def test_hostile_requests_are_4xx_with_a_message(served_folder):
    client, _, keys = served_folder
    huge = 2**63 + 5
    nested = "[" * 100_000 + "]" * 100_000
    replies = [
        client.get(f"/image/{huge}"), client.get(f"/thumbnail/{huge}"), client.get(f"/image/{-huge}"),
        client.post("/search", json={"id": huge}),
        client.post("/knn-service", json={"image_url": f"image/{huge}", "num_images": 2}),
        client.post("/knn-service", json={"image_url": f"http://testserver/image/{huge}", "num_images": 2}),
        client.post("/search", content='{"text": ' + nested + "}"), client.post("/knn-service", content=nested),
        client.post("/metadata", content='{"ids": ' + nested + "}"),
        client.post("/search", content='{"text": "red", "rerank": true, "weight": NaN}'),
        client.post("/search", json={"text": "red", "rerank": True, "weight": 1e308}),
        client.post("/search", json={"text": "red", "rerank": True, "weight": -1e308}),
        client.post("/knn-service", json={"image_url": "http://user:pw@example.com:81/a.jpg", "num_images": 2}),
    ]
    for reply in replies:
        assert 400 <= reply.status_code < 500, (reply.request.url, reply.status_code, reply.text[:200])
        assert reply.json()["detail"], reply.text
    described = client.post("/metadata", json={"ids": [huge, keys["1.png"]]})  # an unknown id has no metadata
    assert described.status_code == 200 and [d["id"] for d in described.json()] == [keys["1.png"]]


# -- runs that stop or hang --------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_skipped_and_the_rest_indexed(tmp_path, demo, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle").save(photos / "a.png")
    draw_shape("blue", "square").save(os.fsdecode(bytes(photos) + b"/caf\xe9.png"))
    log = tmp_path / "skipped.jsonl"
    assert main(["index", str(photos), "--index", str(tmp_path / "ix"), "--skipped-log", str(log)]) == 0
    out = capsys.readouterr()
    assert "indexed 1 image(s)" in out.out and "1 name not UTF-8" in out.out and "caf\\xe9.png" in out.err
    assert "rename" in log.read_text()
    assert [Path(i).name for i in Index.load(tmp_path / "ix").ids()] == ["a.png"]


def test_a_fifo_named_like_a_caption_file_does_not_hang_indexing(tmp_path, demo):
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle").save(photos / "a.png")
    draw_shape("blue", "square").save(photos / "b.png")
    (photos / "b.txt").write_text("a blue square\n")
    os.mkfifo(photos / "a.txt")
    done = subprocess.run([sys.executable, "-m", "clipkit", "-q", "index", str(photos), "--index",
                           str(tmp_path / "ix")], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    index = Index.load(tmp_path / "ix")
    assert len(index) == 2 and index.captions.ids() == [f"{photos / 'b.png'}#0"]


def test_a_fifo_named_like_a_caption_file_does_not_hang_making_shards(tmp_path):
    """`clipkit shards FOLDER` reads NAME.txt beside each image the way `clipkit index` does: a FIFO is no caption
    file (it hung the run before)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("a", "red"), ("b", "blue")):
        draw_shape(colour, "circle").save(photos / f"{name}.png")
    (photos / "b.txt").write_bytes(b"a blue caf\xe9 circle\n")  # (not UTF-8: kept, the odd byte replaced)
    os.mkfifo(photos / "a.txt")
    done = subprocess.run([sys.executable, "-m", "clipkit", "shards", str(photos), str(tmp_path / "shards")],
                          timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 skipped" in done.stdout and "no captions: a.txt is not a regular file" in done.stdout + done.stderr
    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        captions = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".txt")]
    assert captions == ["a blue caf\ufffd circle".encode()]


def test_image_names_that_are_no_regular_file_are_skipped_with_their_reason(tmp_path, demo):
    """A FIFO, a link to a device, a link to a deleted file and a loop of links, named like images: never opened
    (no hang), and said in the skipped list with why, instead of left out without a word."""
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle").save(photos / "a.png")
    os.mkfifo(photos / "fifo.jpg")
    os.symlink("/dev/zero", photos / "zero.jpg")
    os.symlink(photos / "deleted.png", photos / "gone.png")
    os.symlink("loop.jpg", photos / "loop.jpg")
    log = tmp_path / "skipped.jsonl"
    done = subprocess.run([sys.executable, "-m", "clipkit", "index", str(photos), "--index", str(tmp_path / "ix"),
                           "--skipped-log", str(log)], timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 new" in done.stdout and "4 skipped" in done.stdout, done.stdout
    reasons = {Path(json.loads(line)["path"]).name: json.loads(line)["reason"] for line in log.read_text().splitlines()}
    assert set(reasons) == {"fifo.jpg", "zero.jpg", "gone.png", "loop.jpg"}
    assert "not a regular file" in reasons["fifo.jpg"] and "not a regular file" in reasons["zero.jpg"]
    assert "link to nothing" in reasons["gone.png"] and "loop of links" in reasons["loop.jpg"]
    assert len(Index.load(tmp_path / "ix")) == 1


def test_a_postscript_file_never_reaches_ghostscript(tmp_path, demo, served_folder, monkeypatch):
    """Pillow decodes EPS by running Ghostscript on the file: a file named photo.jpg in an indexed folder, or an
    upload, must not make clipkit run a PostScript interpreter on what an attacker wrote."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "ghostscript-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    photos = tmp_path / "mine"
    photos.mkdir()
    draw_shape("red", "circle").save(photos / "a.png")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    (photos / "photo.jpg").write_bytes(eps)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "clipkit", "index", str(photos), "--index", str(tmp_path / "ix")],
                          timeout=120, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "indexed 1 image(s)" in done.stdout and "photo.jpg" in done.stderr
    from PIL import EpsImagePlugin

    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # looked for again, on the PATH above
    client = served_folder[0]
    reply = client.post("/search", json={"image": base64.b64encode(eps).decode()})
    assert reply.status_code == 400 and "not a recognised image format" in reply.json()["detail"]
    assert not marker.exists()


@pytest.mark.parametrize("how", ["shard", "folder", "missing"])
def test_remove_takes_the_items_of_shards(tmp_path, demo, capsys, how):
    shards = write_synthetic(tmp_path / "shards", 20, seed=3, split="test", maxcount=10, workers=1, progress=False)
    ix = str(tmp_path / "ix")
    for shard in shards:
        assert main(["-q", "index", str(shard), "--index", ix]) == 0
    if how == "shard":
        assert main(["remove", str(shards[0]), "--index", ix]) == 0
    elif how == "folder":
        assert main(["remove", str(shards[0].parent), "--index", ix]) == 0
    else:
        shards[0].unlink()
        assert main(["remove", "--missing", "--index", ix]) == 0
    gone = 20 if how == "folder" else 10
    assert f"removed {gone} item(s); {20 - gone} left" in capsys.readouterr().out
    index = Index.load(ix)
    assert not any(i.startswith(f"{shards[0]}#") for i in index.ids())
    assert not any(c.startswith(f"{shards[0]}#") for c in index.captions.ids())
    hits = clipkit.search("a red circle", index, k=20)
    assert all(not h.id.startswith(f"{shards[0]}#") for h in hits)
    if how == "shard":  # indexed again, it comes back in full
        assert main(["-q", "index", str(shards[0]), "--index", ix]) == 0
        assert len(Index.load(ix)) == 20


def test_indexing_the_index_folder_itself_is_refused(tmp_path, demo, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle").save(photos / "a.png")
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(photos), "--index", ix]) == 0
    (Path(ix) / "sub").mkdir()
    draw_shape("blue", "square").save(Path(ix) / "sub" / "b.png")
    for source in (ix, str(Path(ix) / "sub")):
        assert main(["index", source, "--index", ix]) == 2
        assert "this index's own folder" in capsys.readouterr().err
    assert len(Index.load(ix)) == 1 and len(Index.load(ix).roots()) == 1


# -- damaged or unreadable parts of an index ---------------------------------------------------


@pytest.fixture
def captioned_index(tmp_path, demo):
    photos = three_photos(tmp_path, captions=True)
    ix = tmp_path / "ix"
    assert main(["-q", "index", str(photos), "--index", str(ix)]) == 0
    return photos, ix


def test_garbage_inside_the_store_is_a_one_line_error(captioned_index, capsys):
    _, ix = captioned_index
    size = (ix / "meta.sqlite").stat().st_size
    with open(ix / "meta.sqlite", "r+b") as handle:
        handle.seek(min(4096, size - 4096))
        handle.write(os.urandom(4096))
    assert main(["search", "red", "--index", str(ix)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "internal error" not in err and len(err.strip().splitlines()) == 1


def test_a_garbled_or_unreadable_config_is_not_fatal(captioned_index, capsys, monkeypatch):
    _, ix = captioned_index
    (ix / "config.json").write_text("{garbled")
    assert main(["search", "a red circle", "--index", str(ix), "-k", "1", "--paths"]) == 0
    assert capsys.readouterr().out.strip().endswith("0.png")
    assert main(["-q", "index", str(captioned_index[0]), "--index", str(ix)]) == 0  # a writer writes it anew
    assert '"format": "clipkit-index"' in (ix / "config.json").read_text()
    (ix / "config.json").write_text("{garbled")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if self.name == "config.json" else real(self, *a, **k))
    assert len(Index.load(ix)) == 3


def test_an_unreadable_store_says_permission_denied(captioned_index, capsys, monkeypatch):
    from clipkit.index import store

    _, ix = captioned_index
    real = os.access
    monkeypatch.setattr(store.os, "access", lambda path, mode: False if str(path).endswith("ix/meta.sqlite")
                        else real(path, mode))  # as a user other than its owner (these tests may run as root)
    assert main(["search", "red", "--index", str(ix)]) == 2
    assert "permission denied" in capsys.readouterr().err


def test_a_damaged_caption_store_does_not_stop_image_indexing(captioned_index, capsys, caplog):
    photos, ix = captioned_index
    (ix / "captions" / "meta.sqlite").write_bytes(b"garbage" * 1000)
    draw_shape("purple", "circle").save(photos / "3.png")
    assert main(["index", str(photos), "--index", str(ix)]) == 0
    captured = capsys.readouterr()
    assert "indexed 1 image(s)" in captured.out and "caption collection" in caplog.text
    assert len(Index.load(ix)) == 4


def test_remove_is_all_or_nothing_when_captions_cannot_change(captioned_index, capsys, monkeypatch):
    from clipkit.index import store

    photos, ix = captioned_index
    real = os.access
    monkeypatch.setattr(store.os, "access", lambda path, mode: False if mode == os.W_OK and "captions" in str(path)
                        else real(path, mode))  # the caption store on read-only storage
    assert main(["remove", str(photos / "0.png"), "--index", str(ix)]) == 2
    assert "read-only" in capsys.readouterr().err
    monkeypatch.setattr(store.os, "access", real)
    index = Index.load(ix)
    assert len(index) == 3 and len(index.captions) == 3


def test_a_damaged_embedding_is_said_and_embedded_again(captioned_index, capsys, caplog):
    photos, ix = captioned_index
    target = str(photos / "1.png")
    before = Index.load(ix)
    dim, state = before.dim, before.store.vectors_state()
    segment, row = (int(v[0]) for v in before.store.segments.rows(np.asarray(before.keys([target]))))
    file_name = before.store.segments.file(state, segment, "vec")
    before.close()
    with open(file_name, "r+b") as file:  # flipped bytes on disk
        file.seek(int(row) * dim * np.dtype(state["dtype"]).itemsize)
        file.write(np.full(dim, np.nan, state["dtype"]).tobytes())
    db = sqlite3.connect(ix / "meta.sqlite")
    db.execute("UPDATE info SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE name = 'generation'")
    db.commit()
    db.close()
    index = Index.load(ix)  # reads no vector: the damage is found by the first search that reads it
    scores, ids = index.search(np.ones(dim, np.float32), k=3)
    assert not np.isnan(scores).any() and target not in ids[0].tolist()  # never scored, never returned
    assert "damaged embeddings" in caplog.text
    assert main(["index", str(photos), "--index", str(ix)]) == 0
    assert "indexed 1 image(s) (0 new, 1 changed)" in capsys.readouterr().out
    hits = clipkit.search("a blue square", Index.load(ix), k=3)
    assert target in [h.id for h in hits] and all(np.isfinite(h.score) for h in hits)


def test_a_folder_among_many_items_checks_only_its_own_vectors(captioned_index, capsys, monkeypatch):
    """Syncing a folder reads its own items' stored vectors for damage, not the whole collection's."""
    from clipkit.index.store import Store

    photos, ix = captioned_index
    index = Index.load(ix)
    index.add(np.random.default_rng(0).normal(size=(100, index.dim)), ids=[f"other-{n}" for n in range(100)])
    target = str(photos / "2.png")
    keys = np.asarray(index.keys([target]))
    segment, row = (int(v[0]) for v in index.store.segments.rows(keys))
    file_name, state = index.store.segments.file(index.store.vectors_state(), segment, "vec"), index.store.vectors_state()
    index.close()
    with open(file_name, "r+b") as file:
        file.seek(row * index.dim * np.dtype(state["dtype"]).itemsize)
        file.write(np.full(index.dim, np.nan, state["dtype"]).tobytes())

    def whole_pass(*args, **kwargs):
        raise AssertionError("a folder's sync read every stored vector")

    monkeypatch.setattr(Store, "live_vectors", whole_pass)
    assert main(["index", str(photos), "--index", str(ix)]) == 0
    assert "indexed 1 image(s) (0 new, 1 changed)" in capsys.readouterr().out


def test_a_kill_while_switching_to_ann_leaves_the_index_as_it_was(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    Index.from_embeddings(vectors).save(tmp_path / "ix")
    script = ("import os, sys\n"
              "import clipkit.index.live as live\n"
              "from clipkit.index import Index\n"
              "def killed(*args, **kwargs):\n"
              "    os._exit(9)\n"
              "live.build_structure = killed\n"
              "Index.load(sys.argv[1]).set_index_type('IVF16,Flat')\n")
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix")]).returncode == 9
    index = Index.load(tmp_path / "ix")
    assert index.index_type == "flat" and index.structure.startswith("Flat") and index.tuning is None


# -- models that load wrong, or fail badly -------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    import shutil

    transformers = pytest.importorskip("transformers")
    from test_hf import clip_dir

    root = tmp_path_factory.mktemp("hf-doors")
    good = clip_dir(root)
    folders = {"good": good}
    folders["no-tokenizer"] = root / "no-tokenizer"
    shutil.copytree(good, folders["no-tokenizer"])
    for file in folders["no-tokenizer"].iterdir():
        if file.name not in ("config.json", "model.safetensors", "preprocessor_config.json"):
            file.unlink()
    folders["truncated"] = root / "truncated"
    shutil.copytree(good, folders["truncated"])
    weights = folders["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folders["bert"] = root / "bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32)).save_pretrained(
        folders["bert"])
    folders["broken-config"] = root / "broken-config"
    shutil.copytree(good, folders["broken-config"])
    (folders["broken-config"] / "config.json").write_text("{broken")
    folders["empty"] = root / "empty"
    folders["empty"].mkdir()
    return folders


@pytest.mark.parametrize("folder, message", [
    ("no-tokenizer", "no usable tokenizer"), ("truncated", "cannot load the transformers checkpoint .*truncated"),
    ("bert", "holds a BertModel, not a dual encoder"), ("broken-config", "config.json is unreadable"),
    ("empty", "is a folder but not a model .*it is empty"),
])
def test_bad_model_folders_are_refused_in_one_line(hf_folders, folder, message, capsys, tmp_path):
    from clipkit.errors import ClipkitError

    with pytest.raises((ValueError, ClipkitError), match=message):
        clipkit.load_model(str(hf_folders[folder]), device="cpu")
    draw_shape("red", "circle").save(tmp_path / "a.png")
    assert main(["index", str(tmp_path), "--index", str(tmp_path / "ix"), "--model", str(hf_folders[folder])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err and "Loading weights" not in err, err


def test_transformers_loads_quietly(hf_folders, tmp_path):
    """No 'Loading weights' bar or config notice from transformers, with -q and without a terminal."""
    draw_shape("red", "circle").save(tmp_path / "a.png")
    done = subprocess.run([sys.executable, "-m", "clipkit", "-q", "index", str(tmp_path), "--index",
                           str(tmp_path / "ix"), "--model", str(hf_folders["good"])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stderr


def test_reranking_lowers_neither_direction(demo):
    """The demo's ITM head has a cosine weight fitted per direction (image -> text its own), so re-ranking ITC's
    top 16 raises R@1 (or keeps it) both ways, on a gallery no fitting saw."""
    from clipkit.data.captions import synthetic_set
    from clipkit.evaluate import evaluate
    from clipkit.rerankers import HeadReranker

    weights = HeadReranker(demo).weights
    assert "rerank_weight_i2t" in demo.itm.config  # fitted on its own (it may equal text -> image's)
    result = evaluate(demo, synthetic_set(300, seed=11, split="test"), rerank=True, rerank_k=16)
    assert (result.weight, result.weight_i2t) == (weights["t2i"], weights["i2t"])
    for direction in ("t2i", "i2t"):
        assert result.rerank[f"{direction}_R@1"] >= result.itc[f"{direction}_R@1"], (direction, result)


def test_an_image_query_reranks_with_the_image_to_text_weight(demo):
    import copy

    demo = copy.deepcopy(demo)  # weights unlike each other, whatever the shipped head's fit gave
    demo.itm.config["rerank_weight_i2t"] = demo.itm.config["rerank_weight"] / 4
    captions = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square"]
    texts = Index.from_embeddings(clipkit.encode(captions, model=demo), ids=captions,
                                  metadata=[{"caption": c} for c in captions], model=demo)
    query = draw_shape("red", "circle", size=(64, 64))
    hits = clipkit.search(query, texts, k=5, rerank=True)
    from clipkit.rerankers import HeadReranker

    expected = clipkit.score_pairs([query] * 5, [h.id for h in hits], reranker=HeadReranker(demo),
                                   weight=HeadReranker(demo).weights["i2t"])
    np.testing.assert_allclose([h.score for h in hits], expected, atol=RERANK_ATOL)


# -- small things users see ----------------------------------------------------------------------


def test_every_cli_option_has_help_and_model_options_name_the_forms():
    import argparse

    from clipkit.cli import build_parser

    parser = build_parser()
    missing, model_helps = [], []
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            for option in sub._actions:
                if isinstance(option, argparse._HelpAction):
                    continue
                if not option.help:
                    missing.append(f"{name} {'/'.join(option.option_strings) or option.dest}")
                if "--model" in option.option_strings:
                    model_helps.append((name, option.help))
    assert missing == []
    assert len(model_helps) >= 5 and all("hf:" in text and "folder" in text and "hf-hub:" in text
                                         for _, text in model_helps), model_helps


def test_trailing_slash_backend_urls_and_exposed_headers(served_folder, demo):
    from fastapi.testclient import TestClient

    from clipkit.serve import ServeConfig, create_app

    client, _, _ = served_folder
    reply = client.post("http://testserver//knn-service", json={"text": "a red circle", "num_images": 2})  # http://host:8000/ + /knn
    assert reply.status_code == 200 and len(reply.json()) == 2
    assert client.get("http://testserver//indices-list").json() == ["default"]
    index = client.app.state.service.collections["default"].index
    config = ServeConfig(cors_origins=["https://example.org"])
    with TestClient(create_app(index, config=config)) as cors:
        reply = cors.post("/knn-service", json={"text": "red", "num_images": 1, "use_mclip": True},
                          headers={"Origin": "https://example.org"})
        assert reply.headers["x-clipkit-unsupported"] == "use_mclip"
        assert "x-clipkit-unsupported" in reply.headers["access-control-expose-headers"].lower()
