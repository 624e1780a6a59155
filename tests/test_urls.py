"""`clipkit index TABLE` where TABLE lists image URLs (img2dataset's input): each image fetched from a local
HTTP server, its URL the id; failures skipped with their reason; a re-run fetches only what is missing."""

from __future__ import annotations

import http.server
import importlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.index import Index
from conftest import TLS, draw_shape

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")


class _Images(http.server.SimpleHTTPRequestHandler):
    served: list = []

    def do_GET(self):
        type(self).served.append(self.path)
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", "/" + self.path.split("/", 2)[2])
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A local web server with 12 images (and a text file), and the URLs of each."""
    root = tmp_path_factory.mktemp("site")
    for number in range(12):
        draw_shape(COLOURS[number % 4], SHAPES[number % 3], (40 + number, 32), seed=number).save(root / f"{number}.png")
    (root / "notes.txt").write_text("not an image")
    handler = type("Handler", (_Images,), {"served": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield root, base, handler
    server.shutdown()


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text(f"url{sep}caption\n" + "".join(f"{r['url']}{sep}{r.get('caption', '')}\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv"])
def test_a_url_table_indexes_each_image_under_its_url(site, tmp_path, tiny_ckpt, tiny_model, capsys, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    root, base, handler = site
    rows = [{"url": f"{base}/{n}.png", "caption": f"a {COLOURS[n % 4]} {SHAPES[n % 3]}"} for n in range(10)]
    rows += [{"url": f"{base}/moved/10.png", "caption": "redirected"}, {"url": f"{base}/0.png", "caption": "again"},
             {"url": f"{base}/missing.png", "caption": "gone"}, {"url": f"{base}/notes.txt", "caption": "text"},
             {"url": "ftp://example.com/x.png", "caption": "no"}]
    table = write_table(tmp_path / f"urls{suffix}", rows)
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]
    log = tmp_path / "skipped.jsonl"
    assert main(["index", str(table), "--index", str(tmp_path / "ix"), "--skipped-log", str(log), *model]) == 0
    out = capsys.readouterr().out
    assert "11 new" in out and "3 skipped" in out, out
    index = Index.load(tmp_path / "ix")
    good = [f"{base}/{n}.png" for n in range(10)] + [f"{base}/moved/10.png"]
    assert sorted(index.ids()) == sorted(good)
    skipped = {json.loads(line)["path"]: json.loads(line)["reason"] for line in log.read_text().splitlines()}
    assert "404" in skipped[f"{base}/missing.png"] and "not a recognised image" in skipped[f"{base}/notes.txt"]
    assert "not an http(s) URL" in skipped["ftp://example.com/x.png"]
    # the embeddings are those of the same files read from disk
    files = [root / f"{n}.png" for n in range(10)] + [root / "10.png"]
    expected = clipkit.encode(images=files, model=tiny_model)
    np.testing.assert_allclose(index.embeddings(good), expected, atol=2e-3)  # (float16 storage)
    record = index.get([good[3]])[0]
    assert record["url"] == good[3] and record["caption"] == "a yellow circle"
    with pytest.raises(ValueError, match=r"pass \["):
        index.get(good[3])  # one URL alone, not its letters
    # a URL's repeated row (as in clip-retrieval's tables: one row per image-caption pair) adds its caption
    captions = {r["id"]: r["caption"] for r in index.captions.get(index.captions.ids())}
    assert len(captions) == 12 and captions[f"{base}/0.png#1"] == "again" and captions[f"{base}/0.png#0"] == "a red circle"
    # served: each hit carries its URL, which the web page shows (the server fetches nothing)
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    with TestClient(create_app({"web": Index.load(tmp_path / "ix")})) as client:
        hits = client.post("/search", json={"id": index.keys([good[3]])[0], "k": 3}).json()["results"]
        assert hits[0]["item_id"] == hits[0]["url"] == hits[0]["thumbnail_url"] == good[3]
        assert client.get(f"/image/{hits[0]['id']}?index=web").status_code == 404
    # a run again fetches only what failed before
    before = len(handler.served)
    assert main(["-q", "index", str(table), "--index", str(tmp_path / "ix"), *model]) == 0
    assert sorted(handler.served[before:]) == ["/missing.png", "/notes.txt"] and len(index.ids()) == 11
    assert sorted(Index.load(tmp_path / "ix").captions.ids()) == sorted(captions)  # none twice


def test_an_interrupted_url_run_goes_on_without_fetching_again(site, tmp_path, tiny_model, monkeypatch):
    encode = importlib.import_module("clipkit.encode")  # (clipkit.encode is also the function)

    root, base, handler = site
    urls = [f"{base}/{n}.png" for n in range(12)]
    table = write_table(tmp_path / "urls.jsonl", [{"url": u} for u in urls])
    real, batches = encode.embed_image_files, []

    def interrupted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            if batches:
                raise KeyboardInterrupt
            batches.append(batch)
            yield batch

    monkeypatch.setattr(encode, "embed_image_files", interrupted)
    index = Index(tiny_model.dim, model=tiny_model)
    index.save(tmp_path / "ix")
    with pytest.raises(KeyboardInterrupt):
        index.sync_urls(table, batch_size=5)
    assert len(Index.load(tmp_path / "ix")) == 5  # the first batch, committed
    monkeypatch.setattr(encode, "embed_image_files", real)
    before = len(handler.served)
    report = index.sync_urls(table, batch_size=5)
    assert report.added == 7 and report.unchanged == 5
    assert len(handler.served) - before == 7 and sorted(Index.load(tmp_path / "ix").ids()) == sorted(urls)

    calls = []

    def engine(items, model, **options):  # an engine that takes 5 images a call (RayEngine(items_per_call=))
        calls.append(len(items))
        yield from real(items, model, **options)

    engine.items_per_call = 5
    assert Index(tiny_model.dim, model=tiny_model).sync_urls(table, engine=engine).added == 12 and calls == [5, 5, 2]


def test_a_slow_or_huge_url_is_skipped_within_its_limits(site, tmp_path, tiny_model, monkeypatch):
    import clipkit.data.images as images

    root, base, _ = site
    monkeypatch.setattr(images, "_url_fetcher", None)
    monkeypatch.setattr(images, "URL_MAX_BYTES", 100)  # every image here is larger
    table = write_table(tmp_path / "urls.jsonl", [{"url": f"{base}/{n}.png"} for n in range(3)])
    index = Index(tiny_model.dim, model=tiny_model)
    report = index.sync_urls(table)
    assert report.added == 0 and report.skipped_kinds == {"too large": 3}


def test_gzipped_tables_and_laion_column_names_are_read(site, tmp_path, tiny_ckpt, capsys):
    """img2dataset takes .csv.gz / .tsv.gz / .jsonl.gz / .txt.gz tables: so does clipkit, URL tables and tables of
    files alike; a .gz name that is not gzip says so. LAION's parquet names its columns URL and TEXT (img2dataset
    is told --url_col URL --caption_col TEXT): found without options, as a `text` caption column is."""
    import gzip

    urls = [f"{site[1]}/{n}.png" for n in range(4)]
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]
    plain = write_table(tmp_path / "urls.tsv", [{"url": u, "caption": f"number {n}"} for n, u in enumerate(urls)])
    (tmp_path / "urls.tsv.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "list.txt.gz").write_bytes(gzip.compress("\n".join(urls[:2]).encode()))
    assert main(["-q", "index", str(tmp_path / "urls.tsv.gz"), "--index", str(tmp_path / "a"), *model]) == 0
    index = Index.load(tmp_path / "a")
    assert sorted(index.ids()) == sorted(urls) and len(index.captions) == 4
    assert main(["-q", "index", str(tmp_path / "list.txt.gz"), "--index", str(tmp_path / "b"), *model]) == 0
    assert sorted(Index.load(tmp_path / "b").ids()) == sorted(urls[:2])
    files = tmp_path / "files"
    files.mkdir()
    (files / "0.png").write_bytes((site[0] / "0.png").read_bytes())
    (files / "t.csv.gz").write_bytes(gzip.compress(b"image,caption\n0.png,a shape\n"))
    assert main(["-q", "index", str(files / "t.csv.gz"), "--index", str(tmp_path / "c"), *model]) == 0
    assert Index.load(tmp_path / "c").ids() == [str((files / "0.png").resolve())]
    laion = write_table(tmp_path / "laion.parquet", [{"SAMPLE_ID": n, "URL": u, "TEXT": f"laion {n}"}
                                                      for n, u in enumerate(urls)])  # LAION's own column names
    assert main(["-q", "index", str(laion), "--index", str(tmp_path / "e"), *model]) == 0
    laion_index = Index.load(tmp_path / "e")
    assert sorted(laion_index.ids()) == sorted(urls)
    assert sorted(r["caption"] for r in laion_index.captions.get(laion_index.captions.ids())) == \
        [f"laion {n}" for n in range(4)]
    (files / "texts.csv").write_text("image,Text\n0.png,a text column\n")
    assert main(["-q", "index", str(files / "texts.csv"), "--index", str(tmp_path / "f"), *model]) == 0
    assert [r["caption"] for r in Index.load(tmp_path / "f").captions.get(Index.load(tmp_path / "f").captions.ids())] \
        == ["a text column"]
    (tmp_path / "fake.csv.gz").write_text("url\nhttp://x/a.png\n")
    assert main(["index", str(tmp_path / "fake.csv.gz"), "--index", str(tmp_path / "d")]) == 2
    assert "is not gzip-compressed" in capsys.readouterr().err


def test_a_url_table_split_over_processes(site, tmp_path, tiny_ckpt):
    """`--shard I/N` splits a URL table's URLs over N indexes (by a hash of the URL): each URL in one."""
    urls = [f"{site[1]}/{n}.png" for n in range(12)]
    table = write_table(tmp_path / "urls.csv", [{"url": u} for u in urls])
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]
    for rank in range(2):
        assert main(["-q", "index", str(table), "--index", str(tmp_path / "p{rank}"), "--shard", f"{rank}/2",
                     *model]) == 0
    parts = [set(Index.load(tmp_path / f"p{rank}").ids()) for rank in range(2)]
    assert all(parts) and not parts[0] & parts[1] and parts[0] | parts[1] == set(urls)


def test_url_table_arguments(tmp_path, capsys):
    table = write_table(tmp_path / "urls.jsonl", [{"link": "http://127.0.0.1:9/a.png"}])
    assert main(["index", str(table), "--index", str(tmp_path / "ix"), "--url-column", "link",
                 "--captions", str(table)]) == 2
    assert "brings its own captions" in capsys.readouterr().err
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.png\n")
    assert main(["index", str(tmp_path / "urls.txt"), "--index", str(tmp_path / "ix"), "--check"]) == 2
    assert "apply to folders" in capsys.readouterr().err


def test_a_url_table_on_ray_gives_the_same_index(site, tmp_path, tiny_ckpt, capsys):
    pytest.importorskip("ray.data")
    _, base, _ = site
    table = write_table(tmp_path / "urls.jsonl", [{"url": f"{base}/{n}.png", "caption": f"shape {n}"} for n in range(12)]
                        + [{"url": f"{base}/missing.png"}])
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--batch-size", "4"]
    assert main(["-q", "index", str(table), "--index", str(tmp_path / "local"), *model]) == 0
    assert main(["index", str(table), "--index", str(tmp_path / "ray"), "--engine", "ray", "--ray-actors", "2",
                 *model]) == 0
    out = capsys.readouterr().out
    assert "12 new" in out and "1 skipped" in out and "ray: 2 actor(s)" in out
    local, spread = Index.load(tmp_path / "local"), Index.load(tmp_path / "ray")
    ids = sorted(local.ids())
    assert sorted(spread.ids()) == ids and len(ids) == 12
    np.testing.assert_allclose(spread.embeddings(ids), local.embeddings(ids), atol=2e-3)
    assert len(spread.captions) == len(local.captions) == 12


def test_which_tables_are_url_tables(tmp_path):
    from clipkit.data.urls import is_url_table

    plain = write_table(tmp_path / "a.jsonl", [{"url": "http://x/a.png", "caption": "c"}])
    listing = write_table(tmp_path / "b.jsonl", [{"image_path": "a.png", "url": "http://x/a.png"}])
    captions = write_table(tmp_path / "c.jsonl", [{"image": "a.png", "caption": "c"}])
    (tmp_path / "d.txt").write_text("\nhttps://x/a.png\n")
    (tmp_path / "e.txt").write_text("a caption\n")
    assert is_url_table(plain) and is_url_table(tmp_path / "d.txt")
    assert not is_url_table(listing) and is_url_table(listing, "url")  # files and URLs: the URLs when named
    assert not is_url_table(captions) and not is_url_table(tmp_path / "e.txt")


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_url_column_of_local_files_indexes_those_files(site, tmp_path, tiny_ckpt, capsys, suffix):
    """img2dataset's input made of local files (a `url` column of paths, relative or absolute, or file: URLs)
    indexes those files with their captions, not 'not an http(s) URL' for every row."""
    from clipkit.data.urls import is_url_table, table_columns

    root = tmp_path / "files"
    root.mkdir()
    for name, source in (("0.png", "0.png"), ("1.png", "1.png"), ("2 copy.png", "2.png")):
        (root / name).write_bytes((site[0] / source).read_bytes())
    rows = [{"url": "0.png", "caption": "a red circle"},  # relative to the table's folder
            {"url": str(root / "1.png"), "caption": "a green square"},
            {"url": (root / "2 copy.png").as_uri(), "caption": "a blue triangle"}]
    table = write_table(root / f"local{suffix}", rows)
    assert not is_url_table(table) and table_columns(table) == ("url", "caption")
    assert main(["index", str(table), "--index", str(tmp_path / "ix"), "--model", "clipkit-tiny",
                 "--pretrained", str(tiny_ckpt)]) == 0
    assert "indexed 3 image(s) (3 new" in capsys.readouterr().out
    index = Index.load(tmp_path / "ix")
    expected = [str((root / name).resolve()) for name in ("0.png", "1.png", "2 copy.png")]
    assert sorted(index.ids()) == sorted(expected)
    assert sorted(r["caption"] for r in index.captions.get(index.captions.ids())) == sorted(r["caption"] for r in rows)
    assert main(["-q", "shards", str(table), str(tmp_path / "shards")]) == 0  # and `clipkit shards` reads it alike
    assert main(["-q", "index", str(tmp_path / "shards"), "--index", str(tmp_path / "sx")]) == 0
    assert len(Index.load(tmp_path / "sx")) == 3
    web = write_table(tmp_path / f"web{suffix}", [{"url": f"{site[1]}/0.png", "caption": "x"}])
    bare = write_table(tmp_path / f"bare{suffix}", [{"url": "www.example.com/0.png", "caption": "x"}])
    assert is_url_table(web) and is_url_table(bare)  # (a URL without its scheme: skipped as one, as before)


def test_a_run_stopped_between_images_and_captions_stores_them_next_time(site, tmp_path, tiny_model, monkeypatch):
    urls_module = importlib.import_module("clipkit.index.urls")
    root, base, handler = site
    rows = [{"url": f"{base}/{n}.png", "caption": f"picture {n}"} for n in range(6)]
    table = write_table(tmp_path / "urls.jsonl", rows)
    real = urls_module.add_captions

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # after the batch's images were committed, before their captions

    monkeypatch.setattr(urls_module, "add_captions", stopped)
    index = Index(tiny_model.dim, model=tiny_model)
    index.save(tmp_path / "ix")
    with pytest.raises(KeyboardInterrupt):
        index.sync_urls(table, batch_size=6)
    assert len(Index.load(tmp_path / "ix")) == 6 and Index.load(tmp_path / "ix").captions is None
    monkeypatch.setattr(urls_module, "add_captions", real)
    before = len(handler.served)
    report = Index.load(tmp_path / "ix", model=tiny_model).sync_urls(table, batch_size=6)
    assert (report.added, report.unchanged, len(handler.served) - before) == (0, 6, 0)
    back = Index.load(tmp_path / "ix")
    assert {r["id"]: r["caption"] for r in back.captions.get(back.captions.ids())} == {
        f"{base}/{n}.png#0": f"picture {n}" for n in range(6)}


def test_search_by_an_image_url(site, tmp_path, tiny_ckpt, tiny_model, capsys):
    """`clipkit search http://.../x.png` fetches the image and searches by it (it was taken for a missing
    file); a URL that is no image is a one-line error."""
    root, base, handler = site
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]
    assert main(["-q", "index", str(root), "--index", str(tmp_path / "ix"), *model]) == 0
    assert main(["search", f"{base}/4.png", "--index", str(tmp_path / "ix"), "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)[0]
    assert hit["path"] == str((root / "4.png").resolve()) and hit["score"] > 0.999
    assert main(["search", f"{base}/notes.txt", "--index", str(tmp_path / "ix")]) == 2
    err = capsys.readouterr().err
    assert "not a recognised image format" in err and err.count("\n") == 1


class _Proxy(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy as companies run them: `GET http://...` fetched for the client, `CONNECT host:port`
    relayed byte for byte (https), each request's line and Proxy-Authorization recorded."""

    seen: list = []

    def do_GET(self):
        import http.client
        import urllib.parse

        type(self).seen.append((self.requestline, self.headers.get("Proxy-Authorization")))
        url = urllib.parse.urlsplit(self.path)
        upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        upstream.request("GET", url.path)
        answer = upstream.getresponse()
        body = answer.read()
        self.send_response(answer.status)
        for name in ("Location", "Content-Type"):
            if answer.getheader(name):
                self.send_header(name, answer.getheader(name))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_CONNECT(self):
        import select
        import socket

        type(self).seen.append((self.requestline, self.headers.get("Proxy-Authorization")))
        host, port = self.path.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        ends = [self.connection, upstream]
        while True:
            ready, _, _ = select.select(ends, [], [], 10)
            chunks = [(end, end.recv(65536)) for end in ready]
            if not ready or any(not chunk for _, chunk in chunks):
                break
            for end, chunk in chunks:
                (upstream if end is self.connection else self.connection).sendall(chunk)
        upstream.close()

    def log_message(self, *args):
        pass


def test_a_url_table_goes_through_the_user_s_proxy(site, tmp_path, tiny_ckpt, tiny_model, capsys, monkeypatch):
    """Behind a company proxy (HTTP_PROXY / HTTPS_PROXY, as requests, img2dataset and pip read them) every
    image of a URL table failed: clipkit connected to each host itself. http URLs now go to the proxy, https
    ones through its CONNECT tunnel (the certificate still checked against the URL's host), with the
    proxy URL's credentials; NO_PROXY's hosts go straight. (The server's image_url fetches never take a
    proxy: they must connect to the very address they checked.)"""
    import ssl

    root, base, handler = site
    tls = TLS
    secure = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(root)))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls / "localhost.crt", tls / "localhost.key")
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    proxy_handler = type("Proxy", (_Proxy,), {"seen": []})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), proxy_handler)
    for server in (secure, proxy):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    secure_base = f"https://127.0.0.1:{secure.server_address[1]}"
    for variable in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    for variable in ("http_proxy", "https_proxy"):
        monkeypatch.setenv(variable, f"http://someone:p%40ss@127.0.0.1:{proxy.server_address[1]}")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls / "localhost.crt"))  # (trust the test's certificate)
    urls = [f"{base}/0.png", f"{secure_base}/1.png", f"{base}/moved/2.png"]
    table = write_table(tmp_path / "urls.csv", [{"url": url} for url in urls])
    try:
        assert main(["-q", "index", str(table), "--index", str(tmp_path / "ix"), "--model", "clipkit-tiny",
                     "--pretrained", str(tiny_ckpt)]) == 0, capsys.readouterr().err
        credentials = "Basic " + __import__("base64").b64encode(b"someone:p@ss").decode()
        assert sorted(proxy_handler.seen) == sorted([
            (f"GET {base}/0.png HTTP/1.1", credentials), (f"GET {base}/moved/2.png HTTP/1.1", credentials),
            (f"GET {base}/2.png HTTP/1.1", credentials),  # (the redirect, through the proxy too)
            (f"CONNECT 127.0.0.1:{secure.server_address[1]} HTTP/1.0", credentials)])
        index = Index.load(tmp_path / "ix")
        assert sorted(index.ids()) == sorted(urls)
        direct = clipkit.encode([Path(root / f"{n}.png") for n in range(3)], model=tiny_model)
        np.testing.assert_allclose(index.embeddings(urls), direct, atol=2e-3)
        monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")  # a certificate not trusted: refused, not fetched
        more = write_table(tmp_path / "more.csv", [{"url": f"{secure_base}/3.png"}])
        assert main(["index", str(more), "--index", str(tmp_path / "ix2"), "--model", "clipkit-tiny",
                     "--pretrained", str(tiny_ckpt)]) == 0
        out, err = capsys.readouterr()
        assert "1 skipped (1 fetch failed)" in out and "CERTIFICATE_VERIFY_FAILED" in out + err
        assert "through the proxy 127.0.0.1" in out + err
        monkeypatch.setenv("no_proxy", "127.0.0.1")  # NO_PROXY: straight to the host
        seen = len(proxy_handler.seen)
        again = write_table(tmp_path / "again.csv", [{"url": f"{base}/4.png"}])
        assert main(["-q", "index", str(again), "--index", str(tmp_path / "ix3"), "--model", "clipkit-tiny",
                     "--pretrained", str(tiny_ckpt)]) == 0
        assert len(proxy_handler.seen) == seen and len(Index.load(tmp_path / "ix3")) == 1
    finally:
        secure.shutdown()
        proxy.shutdown()
