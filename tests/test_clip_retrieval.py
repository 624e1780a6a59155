"""clip-retrieval compatibility, tested with clip-retrieval's own code: the `ClipClient` and the front end
build from its published wheel (clip-retrieval 2.45.0, downloaded once by pip without its dependencies),
against `clipkit serve` on a captioned folder."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import clipkit  # noqa: E402
from clipkit.cli import main  # noqa: E402
from clipkit.data.synthetic import write_synthetic  # noqa: E402
from clipkit.serve import ServeConfig, create_app  # noqa: E402
from clipkit.serve.clip_retrieval import CAPTION_ID_BASE, UNSUPPORTED  # noqa: E402
from conftest import chromium, running_server  # noqa: E402

CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
META_KEYS = {"image_path", "url", "caption"}


@pytest.fixture(scope="session")
def clip_retrieval_wheel(pytestconfig) -> Path:
    """clip-retrieval's wheel, unpacked: clip_retrieval/clip_client.py and front/build."""
    folder = pytestconfig.cache.mkdir("clip-retrieval-2.45.0")
    if not (folder / "front" / "build" / "index.html").is_file():
        download = folder / "wheel"
        result = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", CLIP_RETRIEVAL,
                                 "-d", str(download)], capture_output=True, text=True, timeout=600)
        wheels = sorted(download.glob("clip_retrieval-*.whl"))
        if result.returncode or not wheels:
            message = f"could not download {CLIP_RETRIEVAL}: {result.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def clip_client(clip_retrieval_wheel):
    """clip-retrieval's `clip_client` module (loaded from its file: the package's __init__ imports its
    whole back end)."""
    pytest.importorskip("requests")
    spec = importlib.util.spec_from_file_location("clip_retrieval_client",
                                                  clip_retrieval_wheel / "clip_retrieval" / "clip_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """60 synthetic images with their NAME.txt captions, indexed (images and captions) by the demo model."""
    root = tmp_path_factory.mktemp("clip-retrieval")
    photos = root / "photos"
    write_synthetic(photos, 60, seed=11, split="test", layout="folder", workers=1, progress=False)
    model = clipkit.load_model("clipkit-demo", device="cpu")
    index = clipkit.Index.from_folder(photos, model)
    index.save(root / "photos.clipkit")
    return {"root": root, "photos": photos, "model": model, "index": index}


@pytest.fixture(scope="module")
def client(captioned):
    config = ServeConfig(inline_images=48)
    with TestClient(create_app({"photos": captioned["index"]}, config=config)) as test_client:
        yield test_client


TOKEN = "front-end-token-0123456789"  # (the server below asks for it, as one reachable from other machines would)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(captioned, clip_retrieval_wheel):
    with running_server("--index", str(captioned["root"] / "photos.clipkit"),
                        "--front", str(clip_retrieval_wheel / "front" / "build"), token=TOKEN) as url:
        yield url


def _first_lines(path: Path) -> str:
    return next(line.strip() for line in path.with_suffix(".txt").read_text().splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------
# clip-retrieval's ClipClient


def test_clip_client_text_image_and_embedding_queries(clip_client, server, captioned):
    index, model = captioned["index"], captioned["model"]
    client = clip_client.ClipClient(url=server + f"knn-service?token={TOKEN}", indice_name="photos", num_images=8,
                                    deduplicate=False)
    results = client.query(text="a small red circle")
    expected = clipkit.search("a small red circle", index, k=8)
    assert [r["image_path"] for r in results] == [h.id for h in expected]
    np.testing.assert_allclose([r["similarity"] for r in results], [h.score for h in expected], atol=1e-4)
    for result in results:  # what clip-retrieval's clients read: the url, the caption, the similarity
        assert set(result) == META_KEYS | {"id", "similarity"}
        assert result["caption"] == _first_lines(Path(result["image_path"]))
        assert httpx.get(result["url"], headers=AUTH).content == Path(result["image_path"]).read_bytes()

    photo = sorted(captioned["photos"].glob("*.jpg"))[4]
    by_file = client.query(image=str(photo))
    assert by_file[0]["image_path"] == str(photo.resolve()) and by_file[0]["similarity"] > 0.999
    vector = clipkit.encode([photo], model=model)[0]
    by_embedding = client.query(embedding_input=vector.tolist())
    assert [r["id"] for r in by_embedding] == [r["id"] for r in by_file]
    # "similar image" by URL: one of this server's own image URLs, answered from the stored embedding
    by_url = client.query(image=by_file[3]["url"])
    assert by_url[0]["id"] == by_file[3]["id"] and by_url[0]["similarity"] > 0.9999


def test_clip_client_text_modality_returns_captions(clip_client, server, captioned):
    index = captioned["index"]
    client = clip_client.ClipClient(url=server + f"knn-service?token={TOKEN}", indice_name="photos", num_images=5,
                                    modality=clip_client.Modality.TEXT, deduplicate=False)
    photo = sorted(captioned["photos"].glob("*.jpg"))[9]
    results = client.query(image=str(photo))  # image -> text
    assert isinstance(results, list) and len(results) == 5
    expected = clipkit.search(photo, index, k=5, modality="text")
    assert [r["caption"] for r in results] == [h.metadata["caption"] for h in expected]
    assert [r["id"] - CAPTION_ID_BASE for r in results] == index.captions.keys([h.id for h in expected])
    assert [r["image_path"] for r in results] == [h.metadata["image_id"] for h in expected]
    own = photo.with_suffix(".txt").read_text().splitlines()
    assert any(r["caption"] in own for r in results)  # the demo model finds one of the image's own captions


# ---------------------------------------------------------------------------------------------
# The protocol, request by request


def _front_body(**fields) -> str:
    """A /knn-service body as clip-retrieval's front end builds it (every flag; undefined ones left out)."""
    body = {"text": "", "image": None, "image_url": None, "embedding_input": None, "modality": "image",
            "num_images": 40, "indice_name": "photos", "num_result_ids": 3000, "use_mclip": False,
            "deduplicate": True, "use_safety_model": True, "use_violence_detector": True}
    return json.dumps({**body, **fields})


def _knn(client, body: str):
    return client.post("/knn-service", content=body, headers={"content-type": "text/plain;charset=UTF-8"})


def test_num_result_ids_then_scrolling_through_metadata(client, captioned):
    index = captioned["index"]
    response = _knn(client, _front_body(text="a blue square", deduplicate=False))
    assert response.status_code == 200
    results = response.json()
    assert len(results) == len(index) == 60  # num_result_ids (3000) caps at what there is
    expected = clipkit.search("a blue square", index, k=60)
    assert [r["id"] for r in results] == index.keys([h.id for h in expected])
    assert all(set(r) >= META_KEYS and "image" in r for r in results[:40])  # num_images with metadata
    assert all(set(r) == {"id", "similarity"} for r in results[40:])  # the rest: ids to page through
    # the front end pages through the rest 40 at a time, as it scrolls
    page = client.post("/metadata", content=json.dumps({"ids": [r["id"] for r in results[40:80]],
                                                        "indice_name": "photos"}),
                       headers={"content-type": "text/plain;charset=UTF-8"}).json()
    assert [m["id"] for m in page] == [r["id"] for r in results[40:]]
    for entry, hit in zip(page, expected[40:]):
        assert set(entry["metadata"]) == META_KEYS | {"image"}
        assert entry["metadata"]["image_path"] == hit.id
        assert entry["metadata"]["caption"] == _first_lines(Path(hit.id))


def test_similar_image_through_image_and_image_url(client, captioned):
    first = _knn(client, _front_body(text="a large green triangle", num_images=6, num_result_ids=6)).json()[2]
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first["image"])))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 48
    # the front end's "similar image" sends the result's base64 `image` when it has one ...
    by_image = _knn(client, _front_body(image=first["image"], num_images=6, num_result_ids=6)).json()
    assert by_image[0]["id"] == first["id"] and by_image[0]["similarity"] > 0.95
    # ... else its `url` as image_url: this server's own URL, answered from the stored embedding, no fetch
    by_url = _knn(client, _front_body(image_url=first["url"], num_images=6, num_result_ids=6)).json()
    stored = captioned["index"].embeddings([first["image_path"]])[0]
    assert by_url[0]["id"] == first["id"] and abs(by_url[0]["similarity"] - float(stored @ stored)) < 1e-5
    relative = _knn(client, _front_body(image_url=f"image/{first['id']}?index=photos", num_images=6,
                                       num_result_ids=6)).json()
    assert [r["id"] for r in relative] == [r["id"] for r in by_url]
    elsewhere = _knn(client, _front_body(image_url=f"http://example.com/image/{first['id']}", num_images=6))
    assert elsewhere.status_code == 403 and "--allow-image-urls" in elsewhere.json()["detail"]
    missing = _knn(client, _front_body(image_url="http://testserver/image/987654?index=photos"))
    assert missing.status_code == 404


def test_text_modality_ids_are_captions(client, captioned):
    index = captioned["index"]
    results = _knn(client, _front_body(text="a small red circle", modality="text", num_images=5,
                                       num_result_ids=30, deduplicate=False)).json()
    expected = clipkit.search("a small red circle", index, k=30, modality="text")
    assert [r["id"] for r in results] == [CAPTION_ID_BASE + k for k in index.captions.keys([h.id for h in expected])]
    assert [r["caption"] for r in results[:5]] == [h.metadata["caption"] for h in expected[:5]]
    page = client.post("/metadata", json={"ids": [r["id"] for r in results[5:10]], "indice_name": "photos"}).json()
    assert [m["metadata"]["caption"] for m in page] == [h.metadata["caption"] for h in expected[5:10]]
    assert [m["metadata"]["image_path"] for m in page] == [h.metadata["image_id"] for h in expected[5:10]]


def test_unsupported_options_are_reported_not_honoured(client):
    reply = _knn(client, _front_body(text="a red circle", num_images=3, aesthetic_score=9, aesthetic_weight=0.5,
                                     use_mclip=True))
    assert reply.status_code == 200
    assert reply.headers["x-clipkit-unsupported"].split(",") == list(UNSUPPORTED)
    plain = _knn(client, _front_body(text="a red circle", num_images=3, use_safety_model=False,
                                     use_violence_detector=False, aesthetic_score=""))
    assert "x-clipkit-unsupported" not in plain.headers
    info = client.get("/healthz").json()["clip_retrieval"]
    assert set(info["unsupported"]) == set(UNSUPPORTED) and info["max_result_ids"] == 10_000
    assert client.get("/indices-list").json() == ["photos"]  # still the plain list clients expect


# ---------------------------------------------------------------------------------------------
# clip-retrieval's front end, served by clipkit


def test_front_is_served_with_its_config(server, clip_retrieval_wheel, tmp_path, capsys):
    assert httpx.get(server + "front/config.json").status_code == 401
    config = httpx.get(server + "front/config.json", headers=AUTH).json()
    assert config == {"defaultBackend": server.rstrip("/"), "defaultIndex": "photos", "urlColumn": "url"}
    page = httpx.get(server + "front/", headers=AUTH)
    assert page.status_code == 200 and "<clip-front>" in page.text
    script = next((clip_retrieval_wheel / "front" / "build").glob("main*.js")).name
    assert httpx.get(server + "front/" + script, headers=AUTH).status_code == 200
    assert httpx.get(server + "healthz", headers=AUTH).json()["clip_retrieval"]["front"] == "front/"
    (tmp_path / "ix").mkdir()
    assert main(["serve", "--index", str(tmp_path / "ix"), "--front", str(tmp_path)]) == 2
    assert "not a clip-retrieval front end build" in capsys.readouterr().err


def _shadow(driver, script: str):
    return driver.execute_script("const root = document.querySelector('clip-front').shadowRoot; " + script)


def test_front_end_in_chromium(server, captioned):
    """clip-retrieval's own page, from clipkit at /front/: text search, scrolling for more, "similar image" on a
    result, and search over text (captions); behind a token, opened by the link `clipkit serve --token` prints
    (its cookie carries the page's requests and images)."""
    with chromium(width=1000, height=700) as driver:
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, 60)
        driver.get(server + f"front/?token={TOKEN}&query=a%20small%20red%20circle")
        figures = "return root.querySelectorAll('figure img.pic').length"
        wait.until(lambda d: _shadow(d, figures) >= 40)
        first_src = _shadow(driver, "return root.querySelector('figure img.pic').src")
        top = clipkit.search("a small red circle", captioned["index"], k=1)[0]
        assert first_src.startswith(server + "image/") and first_src.split("/image/")[1].split("?")[0] == str(
            captioned["index"].keys([top.id])[0])
        # scrolling to the bottom pages the other results in through /metadata
        returned = driver.execute_script("return document.querySelector('clip-front').images.length")
        assert returned > 40  # num_result_ids: all 60 but the near duplicates the page asks to hide
        driver.execute_script("window.scrollTo(0, document.body.scrollHeight); window.onscroll()")
        wait.until(lambda d: _shadow(d, figures) == returned)
        # "similar image" on the third result: the page sends its url back as image_url
        third = _shadow(driver, "return root.querySelectorAll('figure img.pic')[2].src")
        _shadow(driver, "root.querySelectorAll('figure img.subImageSearch')[2].click()")
        wait.until(lambda d: "imageUrl=" in d.current_url)
        wait.until(lambda d: _shadow(d, "const p = root.querySelector('figure img.pic'); return p && p.src") == third)
        # search over text: captions, each shown under its image
        _shadow(driver, "const s = [...root.querySelectorAll('select')].find(s => [...s.options].some("
                        "o => o.value === 'text')); s.value = 'text'; s.dispatchEvent(new Event('input'))")
        wait.until(lambda d: _shadow(d, "return root.querySelector('figcaption') !== null && "
                                        "[...root.querySelectorAll('figcaption')].every(f => f.textContent.trim())"))
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]
                  and "webcomponents-loader" not in e["message"]]
        assert not errors, errors
