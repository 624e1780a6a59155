"""`clipkit serve`: the HTTP API against independent references, every bad input, and the page in Chromium."""

import asyncio
import base64
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import clipkit  # noqa: E402
from clipkit.cli import build_parser, main  # noqa: E402
from clipkit.data.synthetic import write_synthetic  # noqa: E402
from clipkit.serve import ServeConfig, create_app  # noqa: E402
from clipkit.data.fetch import FetchError, check_public_url  # noqa: E402
from conftest import RERANK_ATOL, TLS, chromium, running_server, trusting_tls  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """40 synthetic images (plus an exact duplicate of one) indexed with the demo model."""
    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    write_synthetic(photos, 40, seed=3, layout="folder", workers=1, progress=False)
    for extra in list(photos.glob("*.txt")) + list(photos.glob("*.json")):
        extra.unlink()
    shutil.copy(photos / "train-000000005.jpg", photos / "copy of 5.jpg")
    model = clipkit.load_model("clipkit-demo", device="cpu")
    index = clipkit.Index.from_folder(photos, model)
    index.save(root / "photos.clipkit")
    return {"root": root, "photos": photos, "model": model, "index": index}


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app({"photos": served["index"]})) as test_client:
        yield test_client


def _brute_force(served, vector, k):
    """numpy over the stored embeddings: (ids, scores) of the top k."""
    index = served["index"]
    ids, matrix = index.ids(), index.embeddings()
    scores = matrix @ (vector / np.linalg.norm(vector))
    order = np.argsort(-scores, kind="stable")[:k]
    return [ids[i] for i in order], scores[order]


def test_health_indices_and_openapi(client):
    info = client.get("/healthz").json()
    assert info["status"] == "ok" and info["indexes"]["photos"] == {"items": 41, "model": "clipkit-demo",
                                                                      "dim": 128, "rerank": True,
                                                                      "captions": 0, "structure": "Flat",
                                                                      "estimated_recall": None}
    assert client.get("/indices-list").json() == ["photos"]
    spec = client.get("/openapi.json").json()
    for route in ("/search", "/knn-service", "/metadata", "/image/{item_id}", "/thumbnail/{item_id}", "/healthz"):
        assert route in spec["paths"]
    assert "text" in spec["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_text_search_matches_brute_force(client, served):
    response = client.post("/search", json={"text": "a red circle", "k": 7})
    assert response.status_code == 200
    results = response.json()["results"]
    vector = clipkit.encode(["a red circle"], model=served["model"])[0]
    ids, scores = _brute_force(served, vector, 7)
    assert [r["item_id"] for r in results] == ids
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
    assert results == sorted(results, key=lambda r: -r["score"])
    keys = served["index"].keys(ids)
    assert [r["id"] for r in results] == keys
    # every result's thumbnail and file come back, the file byte for byte
    first = results[0]
    assert client.get(first["image_url"]).content == Path(first["path"]).read_bytes()
    thumb = client.get(first["thumbnail_url"] + "&size=32")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"


def test_image_queries_upload_base64_id_and_vector(client, served):
    path = served["photos"] / "train-000000011.jpg"
    data = path.read_bytes()
    uploaded = client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"}).json()
    as_json = client.post("/search", json={"image": base64.b64encode(data).decode(), "k": 3}).json()
    data_url = client.post("/search", json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
                                            "k": 3}).json()
    as_body = client.post("/search?k=3", content=data, headers={"content-type": "image/jpeg"}).json()  # curl --data-binary
    assert uploaded["results"] == as_json["results"] == data_url["results"] == as_body["results"]
    both = client.post("/search?k=3&text=x", content=data, headers={"content-type": "application/octet-stream"})
    assert both.status_code == 400 and "(got text, image)" in both.json()["detail"]
    bad_k = client.post("/search?k=0", content=data, headers={"content-type": "image/jpeg"})
    assert bad_k.status_code == 422 and bad_k.json()["detail"].startswith("k:")
    assert uploaded["results"][0]["item_id"] == str(path.resolve()) and uploaded["results"][0]["score"] > 0.999
    vector = clipkit.encode([path], model=served["model"])[0]
    ids, _ = _brute_force(served, vector, 3)
    assert [r["item_id"] for r in uploaded["results"]] == ids

    key = uploaded["results"][0]["id"]
    by_id = client.post("/search", json={"id": key, "k": 3}).json()["results"]
    assert by_id[0]["id"] == key and [r["item_id"] for r in by_id] == ids
    by_item = client.post("/search", json={"item": uploaded["results"][0]["item_id"], "k": 3}).json()["results"]
    assert by_item == by_id  # (an item by its id as results give it)
    unknown = client.post("/search", json={"item": "/nowhere/x.jpg"})
    assert unknown.status_code == 404 and "no item '/nowhere/x.jpg'" in unknown.json()["detail"]
    assert client.post("/search", json={"item": "x", "id": key}).status_code == 400
    by_vector = client.post("/search", json={"embedding": vector.tolist(), "k": 3}).json()["results"]
    assert [r["item_id"] for r in by_vector] == ids


def test_rerank_matches_library_search(client, served):
    response = client.post("/search", json={"text": "a green square left of a blue circle", "k": 5, "rerank": True,
                                            "rerank_k": 12}).json()
    expected = clipkit.search("a green square left of a blue circle", served["index"], k=5, rerank=True, rerank_k=12)
    assert response["reranked"] is True
    assert [r["item_id"] for r in response["results"]] == [h.id for h in expected]
    np.testing.assert_allclose([r["score"] for r in response["results"]], [h.score for h in expected],
                               atol=RERANK_ATOL)
    assert all("itc_score" in r for r in response["results"])


def test_re_ranked_requests_find_their_candidates_together_and_rank_as_the_library(served, monkeypatch):
    """A re-ranked request's candidates come from the search batcher (with other requests'), not from a search
    of its own on the model's thread, and are decoded in the thread pool; only their scoring runs on the model's
    thread. Its ranking is still the library's."""
    import importlib
    import threading

    rerankers = importlib.import_module("clipkit.rerankers")
    decoding_threads, real_load_images = set(), rerankers.load_images

    def load_images(*args, **kwargs):
        decoding_threads.add(threading.current_thread().name)
        return real_load_images(*args, **kwargs)

    monkeypatch.setattr(rerankers, "load_images", load_images)
    app = create_app({"photos": served["index"]})
    texts = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "triangle")]

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            responses = await asyncio.gather(*(http.post("/search", json={"text": t, "k": 4, "rerank": True,
                                                                          "rerank_k": 10}) for t in texts))
            return responses, (await http.get("/healthz")).json()

    responses, info = asyncio.run(run())
    assert decoding_threads and not any(name.startswith("clipkit-") for name in decoding_threads)  # (not the model's)
    for text, response in zip(texts, responses):
        expected = clipkit.search(text, served["index"], k=4, rerank=True, rerank_k=10)
        assert [r["item_id"] for r in response.json()["results"]] == [h.id for h in expected]
        np.testing.assert_allclose([r["score"] for r in response.json()["results"]], [h.score for h in expected],
                                   atol=RERANK_ATOL)
    assert info["searched_queries"] == len(texts) and info["index_searches"] < len(texts)


def test_clip_retrieval_round_trip(client, served):
    """The request clip-retrieval's front end sends (text/plain JSON, its flags) and the reply it reads."""
    request = {"text": "a blue square", "image": None, "image_url": None, "embedding_input": None,
               "modality": "image", "num_images": 4, "indice_name": "photos", "num_result_ids": 4,
               "use_mclip": False, "deduplicate": False, "use_safety_model": True, "use_violence_detector": True,
               "aesthetic_score": "", "aesthetic_weight": ""}
    response = client.post("/knn-service", content=json.dumps(request), headers={"content-type": "text/plain"})
    assert response.status_code == 200
    results = response.json()
    vector = clipkit.encode(["a blue square"], model=served["model"])[0]
    ids, scores = _brute_force(served, vector, 4)
    assert [r["image_path"] for r in results] == ids
    np.testing.assert_allclose([r["similarity"] for r in results], scores, atol=1e-5)
    assert all(isinstance(r["id"], int) for r in results)
    fetched = client.get(results[0]["url"].replace("http://testserver", ""))
    assert fetched.content == Path(results[0]["image_path"]).read_bytes()

    metadata = client.post("/metadata", json={"ids": [r["id"] for r in results] + [987654], "indice_name": "photos"})
    assert [m["id"] for m in metadata.json()] == [r["id"] for r in results]  # the unknown id is left out
    assert [m["metadata"]["image_path"] for m in metadata.json()] == ids

    image = base64.b64encode((served["photos"] / "train-000000005.jpg").read_bytes()).decode()
    plain = client.post("/knn-service", json={"image": image, "modality": "image", "num_images": 3,
                                              "indice_name": "photos"}).json()
    names = [Path(r["image_path"]).name for r in plain]
    assert set(names[:2]) == {"train-000000005.jpg", "copy of 5.jpg"}  # the file and its exact copy
    deduplicated = client.post("/knn-service", json={"image": image, "modality": "image", "num_images": 5,
                                                     "num_result_ids": 20, "indice_name": "photos",
                                                     "deduplicate": True}).json()
    near, _ = _brute_force(served, clipkit.encode([served["photos"] / "train-000000005.jpg"],
                                                  model=served["model"])[0], 20)
    vectors, kept = served["index"].embeddings(near), []
    for i in range(20):  # greedy: keep what is under 0.94 cosine of every better-ranked kept result
        if all(vectors[i] @ vectors[j] < 0.94 for j in kept):
            kept.append(i)
    got = [r["image_path"] for r in deduplicated[:5]]  # num_images with their metadata ...
    assert len(got) == 5 and got[1:] == [near[i] for i in kept[1:5]]
    assert len(deduplicated) == len(kept)  # ... and the rest of num_result_ids (deduplicated) as ids only
    assert all(set(r) == {"id", "similarity"} for r in deduplicated[5:])
    assert [r["id"] for r in deduplicated[1:]] == served["index"].keys([near[i] for i in kept[1:]])
    assert Path(got[0]).name in set(names[:2])  # the file or its copy (they tie), never both
    embedded = client.post("/knn-service", json={"embedding_input": vector.tolist(), "modality": "image",
                                                 "num_images": 4, "indice_name": "photos"}).json()
    assert [r["image_path"] for r in embedded] == ids


BAD_REQUESTS = [
    ("/search", {"content": b"{not json"}, 400, "not valid JSON"),
    ("/search", {"json": [1, 2]}, 400, "JSON object"),
    ("/search", {"json": {"k": 3}}, 400, "exactly one of"),
    ("/search", {"json": {"text": "x", "id": 3}}, 400, "got text, id"),
    ("/search", {"json": {"text": "   "}}, 400, "empty"),
    ("/search", {"json": {"text": ""}}, 400, "the text query is empty"),
    ("/search", {"data": {"text": ""}, "files": {"none": ("", b"", "text/plain")}}, 400, "the text query is empty"),
    ("/search", {"json": {"text": "x", "k": 0}}, 422, "k"),
    ("/search", {"json": {"text": "x", "k": "many"}}, 422, "k"),
    ("/search", {"json": {"text": 5}}, 422, "text"),
    ("/search", {"json": {"id": True}}, 422, "id: expected a number, not true/false"),  # (was item 1)
    ("/search", {"json": {"text": "x", "k": True}}, 422, "k: expected a number"),
    ("/search", {"json": {"embedding": [True] + [0.5] * 127}}, 422, "embedding.0: expected a number"),
    ("/search", {"data": {"text": "x", "k": "true"}, "files": {"none": ("", b"", "text/plain")}}, 422, "k:"),
    ("/search", {"json": {"image": "%%%not base64"}}, 400, "base64"),
    ("/search", {"json": {"image": base64.b64encode(b"<html>hello</html>").decode()}}, 400, "not a recognised image"),
    ("/search", {"files": {"image": ("e.jpg", b"", "image/jpeg")}}, 400, "empty"),
    ("/search", {"files": {"photo": ("e.jpg", b"xx", "image/jpeg")}}, 400, "'image'"),
    ("/search", {"json": {"embedding": [1.0, 2.0]}}, 400, "dimension 2"),
    ("/search", {"json": {"embedding": [0.0] * 128}}, 400, "all-zero"),
    ("/search", {"content": b'{"embedding": [NaN' + b", 1.0" * 127 + b"]}"}, 400, "NaN"),
    ("/search", {"json": {"text": "x", "index": "nope"}}, 404, "no index named 'nope'"),
    ("/search", {"json": {"id": 987654}}, 404, "no item with id 987654"),
    ("/search", {"json": {"id": 3, "rerank": True}}, 400, "a vector query has neither"),  # the library's words
    ("/knn-service", {"json": {"text": "x", "modality": "text", "num_images": 2}}, 400, "holds no captions"),
    ("/knn-service", {"json": {"modality": "image", "num_images": 2}}, 400, "give one of"),
    ("/knn-service", {"json": {"text": "x", "num_images": -1}}, 422, "num_images"),
    ("/knn-service", {"json": {"image_url": "http://127.0.0.1/x.jpg", "num_images": 2}}, 403, "--allow-image-urls"),
    ("/metadata", {"json": {"indice_name": "photos"}}, 422, "ids"),
    ("/metadata", {"json": {"ids": ["a"]}}, 422, "ids"),
    ("/metadata", {"json": {"ids": [True]}}, 422, "ids.0: expected a number"),
    ("/knn-service", {"json": {"text": "x", "num_images": True}}, 422, "num_images: expected a number"),
]


@pytest.mark.parametrize("route, kwargs, status, message", BAD_REQUESTS)
def test_bad_requests_are_4xx_with_a_message(client, route, kwargs, status, message):
    response = client.post(route, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("url", [
    "/image/..%2F..%2F..%2Fetc%2Fpasswd", "/image/../../etc/passwd", "/image/%2Fetc%2Fpasswd", "/image/-1",
    "/image/1.5", "/image/1?index=..%2F..%2Fetc", "/thumbnail/..%2F..%2Fetc%2Fpasswd", "/thumbnail/%2Fetc%2Fpasswd",
    "/thumbnail/1?size=100000", "/thumbnail/987654", "/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "/static/../app.py", "/image/987654",
])
def test_file_routes_refuse_traversal(client, url):
    response = client.get(url)
    assert 400 <= response.status_code < 500, (url, response.status_code)
    assert b"root:" not in response.content and b"def create_app" not in response.content


def test_vanished_file_is_404(served, tmp_path):
    photos = tmp_path / "few"
    photos.mkdir()
    for name in ("train-000000001.jpg", "train-000000002.jpg"):
        shutil.copy(served["photos"] / name, photos / name)
    index = clipkit.Index.from_folder(photos, served["model"])
    with TestClient(create_app(index)) as client:
        key = index.keys([str((photos / "train-000000001.jpg").resolve())])[0]
        assert client.get(f"/image/{key}").status_code == 200
        (photos / "train-000000001.jpg").unlink()
        assert client.get(f"/image/{key}").status_code == 404
        assert client.get(f"/thumbnail/{key}").status_code == 404


def test_limits_body_size_and_k_cap(served):
    config = ServeConfig(max_k=5, max_body_bytes=2000)
    with TestClient(create_app({"photos": served["index"]}, config=config)) as client:
        results = client.post("/search", json={"text": "a red circle", "k": 500}).json()["results"]
        assert len(results) == 5
        assert len(client.post("/knn-service", json={"text": "red", "num_images": 100}).json()) == 5
        big = client.post("/search", json={"text": "x" * 5000})
        assert big.status_code == 413 and "limit" in big.json()["detail"]
        upload = client.post("/search", files={"image": ("a.jpg", b"\xff" * 5000, "image/jpeg")})
        assert upload.status_code == 413


def test_cors_is_off_unless_asked(served):
    headers = {"Origin": "https://example.org"}
    with TestClient(create_app({"photos": served["index"]})) as client:
        assert "access-control-allow-origin" not in client.get("/healthz", headers=headers).headers
    config = ServeConfig(cors_origins=["https://example.org"])
    with TestClient(create_app({"photos": served["index"]}, config=config)) as client:
        assert client.get("/healthz", headers=headers).headers["access-control-allow-origin"] == "https://example.org"


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1/a.jpg", False), ("http://localhost:8000/a.jpg", False), ("http://10.1.2.3/a.jpg", False),
    ("http://192.168.0.1/a.jpg", False), ("http://169.254.169.254/latest/meta-data", False),
    ("http://[::1]/a.jpg", False), ("http://0.0.0.0/a.jpg", False), ("http://[::ffff:127.0.0.1]/a.jpg", False),
    ("file:///etc/passwd", False), ("ftp://93.184.215.14/a.jpg", False), ("http://93.184.215.14/a.jpg", True),
])
def test_image_url_only_to_public_hosts(url, allowed):
    if allowed:
        check_public_url(url)
    else:
        with pytest.raises(FetchError):
            check_public_url(url)


def test_image_url_to_loopback_refused_when_allowed(served):
    with TestClient(create_app({"photos": served["index"]}, config=ServeConfig(allow_image_urls=True))) as client:
        response = client.post("/knn-service", json={"image_url": "http://127.0.0.1:9/a.jpg", "num_images": 2})
        assert response.status_code == 400 and "non-public" in response.json()["detail"]


def test_concurrent_queries_are_batched_and_all_answered(served):
    app = create_app({"photos": served["index"]})
    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow", "purple", "orange")
             for s in ("circle", "square", "triangle", "star", "heart", "cross")] * 4  # 144 queries
    vectors = clipkit.encode(texts, model=served["model"])
    expected = [_brute_force(served, v, 3) for v in vectors]

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            responses = await asyncio.gather(*(http.post("/search", json={"text": t, "k": 3}) for t in texts))
            info = (await http.get("/healthz")).json()
        return responses, info

    responses, info = asyncio.run(run())
    assert all(r.status_code == 200 for r in responses)
    for response, (ids, scores) in zip(responses, expected):
        hits = response.json()["results"]
        # the same top 3 as numpy; the exact duplicate of image 5 ties with it, so tied ids may swap places
        np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-4)
        assert len({h["item_id"] for h in hits}) == 3
        assert all(h["item_id"] in ids or abs(h["score"] - scores[-1]) < 1e-4 for h in hits)  # or ties the 3rd
    assert info["encoded_queries"] == len(texts) == info["searched_queries"]
    assert info["encoder_calls"] < len(texts) / 4  # queries that arrived together shared encoder calls
    assert info["index_searches"] < len(texts) / 4  # and index searches


def test_searches_queued_together_are_made_together_and_each_gets_its_own_answer(served):
    """The server's search batcher: the queued searches of one index, depth and folder in one index search;
    each answer equals the library's search of that query alone; a search whose folder holds nothing fails
    alone."""
    from clipkit.search import nearest_hits_many
    from clipkit.serve.batcher import SearchBatcher

    index, photos = served["index"], str(served["photos"])
    vectors = clipkit.encode([f"a {c} circle" for c in ("red", "green", "blue", "yellow", "purple", "orange")] * 2,
                             model=served["model"])
    asks = [(v, 3 + i % 2, photos if i % 3 == 0 else None) for i, v in enumerate(vectors)]
    asks.append((vectors[0], 3, str(served["root"] / "nowhere")))
    searcher = SearchBatcher()

    async def run():
        return await asyncio.gather(*(searcher.nearest(index, v, k, under) for v, k, under in asks),
                                    return_exceptions=True)

    results = asyncio.run(run())
    for (vector, k, under), hits in zip(asks, results[:-1]):
        (alone,) = nearest_hits_many(index, [vector], k, under=under)
        assert [(h.id, h.key) for h in hits] == [(h.id, h.key) for h in alone]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], atol=1e-6)
    assert isinstance(results[-1], ValueError) and "no indexed item lies under" in str(results[-1])
    assert searcher.items == len(asks) and searcher.batches == 5  # k 3 or 4, in photos or anywhere; nowhere


def test_a_token_guards_every_route_and_a_link_with_it_opens_the_page(served):
    """`clipkit serve --token`: without it anyone who reaches the port searches and views every image."""
    config = ServeConfig(token="s3cret-token-0123456789", cors_origins=["https://example.org"])
    with TestClient(create_app({"photos": served["index"]}, config=config)) as client:
        for method, route in (("get", "/"), ("get", "/healthz"), ("get", "/indices-list"), ("get", "/image/1"),
                              ("get", "/thumbnail/1"), ("get", "/openapi.json"), ("post", "/search"),
                              ("post", "/knn-service"), ("post", "/metadata")):
            refused = getattr(client, method)(route)
            assert refused.status_code == 401 and "token" in refused.json()["detail"], route
        for wrong in ({"Authorization": "Bearer s3cret-token-0123456788"}, {"Cookie": "clipkit_token=nope"},
                      {"Authorization": "s3cret-token-0123456789"}):  # (a Bearer header is Bearer TOKEN)
            assert client.get("/healthz", headers=wrong).status_code == 401
        assert client.get("/healthz?token=s3cret-token-012345678").status_code == 401
        assert client.get("/healthz", headers={"Cookie": 'clipkit_token="s3cret\\x; a=b'}).status_code == 401
        with pytest.raises(Exception):  # (no websocket route, and none would pass ungated)
            with client.websocket_connect("/search"):
                pass
        asked = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})  # a browser: a form asks
        assert asked.status_code == 401 and '<input name="token"' in asked.text and "s3cret" not in asked.text
        linked_search = client.get('/?q=a+"red"+<circle>&k=6&token=wrong', headers={"Accept": "text/html"})
        assert ('<input type="hidden" name="q" value="a &quot;red&quot; &lt;circle&gt;">'
                '<input type="hidden" name="k" value="6">') in linked_search.text  # the form keeps the search
        assert "wrong" not in linked_search.text
        bearer = {"Authorization": "Bearer s3cret-token-0123456789"}
        found = client.post("/search", json={"text": "a red circle", "k": 3}, headers=bearer)
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        browser = {"Accept": "text/html,application/xhtml+xml"}
        linked = client.get("/?token=s3cret-token-0123456789&index=photos", headers=browser, follow_redirects=False)
        assert linked.status_code == 303 and linked.headers["location"] == "./?index=photos"  # the token out of sight
        assert "HttpOnly" in linked.headers["set-cookie"] and "SameSite=Strict" in linked.headers["set-cookie"]
        assert client.get("/thumbnail/3?token=s3cret-token-0123456789", headers=browser,
                          follow_redirects=False).headers["location"] == "3"  # (relative: behind a proxy's prefix too)
        page = client.get("/?index=photos", headers=browser)  # (with the cookie it set)
        assert page.status_code == 200 and 'id="query"' in page.text
        thumbnail = "/" + found.json()["results"][0]["thumbnail_url"]
        assert client.get(thumbnail).status_code == 200  # the cookie, as the page's <img> carries it
        client.cookies.clear()
        assert client.get(thumbnail).status_code == 401
        knn = client.post("/knn-service?token=s3cret-token-0123456789", json={"text": "a red circle", "num_images": 2})
        assert knn.status_code == 200 and len(knn.json()) == 2  # clip-retrieval's client, given the URL with it
        preflight = client.options("/search", headers={"Origin": "https://example.org",
                                                        "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200  # (browsers send preflights without credentials)
        client.cookies.clear()
        denied = client.post("/search", json={"text": "x"}, headers={"Origin": "https://example.org"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://example.org"


def test_serving_beyond_this_machine_warns_without_a_token(served, capsys, monkeypatch):
    import uvicorn

    index = served["root"] / "photos.clipkit"
    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: ran.append(self.config.app) or None)
    assert main(["serve", "--index", str(index), "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert "warning: serving on 0.0.0.0 without --token" in err and len(ran) == 1
    assert main(["serve", "--index", str(index), "--port", "0"]) == 0  # this machine only: no warning
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", str(index), f"again={index}", "--port", "0"]) == 0  # indexes as `clipkit info` takes one
    assert list(ran[-1].state.service.collections) == ["photos", "again"] and not capsys.readouterr().err
    assert main(["-q", "serve", "--index", str(index), "--host", "0.0.0.0", "--port", "0",
                 "--token", "auto"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "/?token=" in out  # a made token is printed even with -q: the link
    import socket

    assert f"from other machines: http://{socket.gethostname()}:" in out  # (0.0.0.0 is no address to open)
    assert "cross the network in clear" in err and "--tls-cert" in err  # (plain http beyond this machine)
    token = out.split("?token=")[1].split()[0]
    from clipkit.serve.token import HideToken

    hiding = [f for f in logging.getLogger("uvicorn.access").filters if isinstance(f, HideToken)]
    line = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                             ("1.2.3.4:5", "GET", f"/?index=a&token={token}&k=3", "1.1", 303), None)
    assert hiding and hiding[0].filter(line) and token not in line.getMessage()
    assert "/?index=a&token=(hidden)&k=3" in line.getMessage()  # the access log: the token hidden
    assert len(token) >= 24 and TestClient(ran[-1]).get(f"/healthz?token={token}").status_code == 200
    assert main(["serve", "--index", str(index), "--port", "0", "--token", "one-of-my-own-0123456789"]) == 0
    out = capsys.readouterr().out  # a token of the user's own is not printed (a log is read by more people)
    assert "one-of-my-own" not in out and "with its token" in out
    assert main(["serve", "--index", str(index), "--port", "0", "--token", "short"]) == 2
    assert "16 to 256 letters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the token itself"):  # the library: a token to give out, not "auto"
        create_app({"photos": served["index"]}, config=ServeConfig(token="auto"))
    monkeypatch.setenv("CLIPKIT_SERVE_TOKEN", "from-the-environment-0123")
    assert build_parser().parse_args(["serve"]).token == "from-the-environment-0123"


def test_https_with_a_certificate_and_a_secure_cookie(served, tmp_path, capsys):
    """`clipkit serve --tls-cert --tls-key`: the token and the images do not cross the network in clear."""
    index = str(served["root"] / "photos.clipkit")
    token = "over-tls-0123456789abcdef"
    with running_server("--index", index, token=token, tls=True) as url:
        assert url.startswith("https://")
        linked = httpx.get(url + f"?token={token}", headers={"Accept": "text/html"}, verify=trusting_tls())
        assert linked.status_code == 303 and linked.headers["set-cookie"].endswith("; Secure")
        found = httpx.post(url + "search", json={"text": "a red circle", "k": 2}, verify=trusting_tls(),
                           headers={"Authorization": f"Bearer {token}"})
        assert found.status_code == 200 and len(found.json()["results"]) == 2
        with pytest.raises(httpx.HTTPError):  # plain http to it: no answer
            httpx.get(url.replace("https:", "http:") + "healthz", timeout=5)
    for args, message in ((["--tls-cert", str(tmp_path / "none.pem")], "no TLS certificate or key file at"),
                          (["--tls-cert", str(TLS / "localhost.crt")], "--tls-key KEY"),  # (the key elsewhere)
                          (["--tls-cert", str(TLS / "localhost.key"), "--tls-key", str(TLS / "localhost.key")],
                           "cannot serve https"),
                          (["--tls-key", str(TLS / "localhost.key")], "--tls-key goes with --tls-cert")):
        assert main(["serve", "--index", index, "--port", "0", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err


def test_clipkit_search_asks_a_running_server_as_the_library_searches(served, capsys, monkeypatch):
    """`clipkit search --server URL`: a text, an image file and an indexed photo that is not here (by its
    stored embedding there) answered by the server (re-ranked too), the
    hits those of `clipkit.search` here, with no torch imported in the searching process (a search that took
    ~6 s to start takes ~0.5 s); a missing token, a server not running, an unknown index: one line, exit 2."""
    import subprocess
    import sys

    index = served["root"] / "photos.clipkit"
    photo = served["photos"] / "train-000000007.jpg"
    with running_server("--index", str(index), "--index", f"again={index}", token=PAGE_TOKEN) as url:
        monkeypatch.setenv("CLIPKIT_SERVE_TOKEN", PAGE_TOKEN)
        code = ("import sys, json; from clipkit.cli import main; code = main(sys.argv[1:]); "
                "print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}), file=sys.stderr)")
        run = subprocess.run([sys.executable, "-c", code, "search", "a red circle", str(photo), "--server", url,
                              "-k", "5", "--json"], capture_output=True, text=True, timeout=120)
        assert json.loads(run.stderr.splitlines()[-1]) == {"code": 0, "torch": False}, run.stderr
        answers = [json.loads(line) for line in run.stdout.splitlines()]
        local = [clipkit.search(q, served["index"], k=5) for q in ("a red circle", Path(photo))]
        for answer, hits in zip(answers, local):
            assert [h["id"] for h in answer["hits"]] == [h.id for h in hits]
            np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in hits], atol=1e-5)
        assert main(["search", "a blue square", "--server", url, "--index", "again", "-k", "3", "--rerank"]) == 0
        reranked = clipkit.search("a blue square", served["index"], k=3, rerank=True)
        assert capsys.readouterr().out.split() == [word for rank, hit in enumerate(reranked, 1)
                                                   for word in (str(rank), f"{hit.score:.4f}", hit.path)]
        gone = photo.rename(photo.with_suffix(".away"))  # a photo the server indexes, not here (another machine)
        try:
            assert main(["search", str(photo), "--server", url, "-k", "4", "--json"]) == 0
        finally:
            gone.rename(photo)
        stored = served["index"].embeddings([str(photo)])[0]  # (searched by the embedding the server stores)
        assert [h["id"] for h in json.loads(capsys.readouterr().out)] == [
            h.id for h in clipkit.search(stored, served["index"], k=4)]
        assert main(["search", "nowhere/x.jpg", "--server", url]) == 2
        assert "no such file here, and the server indexes no item" in capsys.readouterr().err
        for args, message in ((["--index", "nope"], "no index named 'nope'"), (["--device", "cpu"], "--device"),
                              (["--text"], "clipkit: error: the text query is empty")):
            assert main(["search", " " if "--text" in args else "x", "--server", url, *args]) == 2
            assert message in capsys.readouterr().err
        monkeypatch.delenv("CLIPKIT_SERVE_TOKEN")
        assert main(["search", "x", "y", "--server", url]) == 2
        err = capsys.readouterr().err
        assert "needs its token: set CLIPKIT_SERVE_TOKEN" in err and len(err.splitlines()) == 1  # (said once)
    assert main(["search", "x", "--server", url]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_cli_serve_errors_and_defaults(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
    assert "no index at" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "65535" in capsys.readouterr().err
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.cors == [] and not args.allow_image_urls


def test_a_port_in_use_is_a_one_line_error_before_anything_loads(tmp_path, capsys, monkeypatch):
    """uvicorn logged the bind error after the indexes and models had loaded, and exited 3; now the port is
    taken first, and what stops it is one line (exit 2) with what to do."""
    import socket

    index = clipkit.Index(4)
    index.add(np.eye(4, dtype=np.float32), ids=list("abcd"))
    index.save(tmp_path / "ix")

    def no_load(specs):
        raise AssertionError("the indexes were loaded before the port was taken")

    monkeypatch.setattr("clipkit.serve.app.load_indexes", no_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--index", str(tmp_path / "ix"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot serve on 127.0.0.1:{port}" in err and "pick another --port" in err and len(err.splitlines()) == 1
    assert main(["serve", "--index", str(tmp_path / "ix"), "--host", "no-such-host.invalid"]) == 2
    assert "--host" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The page in a real browser

PAGE_TOKEN = "a-token-for-the-page-test"


@pytest.fixture
def server(served):
    with running_server("--index", str(served["root"] / "photos.clipkit"), token=PAGE_TOKEN) as url:
        yield url


def test_page_in_headless_chromium(server, served, tmp_path):
    """The page as users open it, on a server that asks for a token: the link `clipkit serve` prints (?token=)
    sets the cookie that the page's requests and its images then carry."""
    assert httpx.get(server).status_code == 401
    with chromium() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, 60)
        driver.get(server + f"?token={PAGE_TOKEN}")
        wait.until(lambda d: "images indexed" in d.find_element(By.ID, "status").text)
        assert "token" not in driver.current_url  # (redirected: the token out of the address bar and history)
        assert driver.find_element(By.ID, "rerank-field").is_displayed()  # the demo model has an ITM head
        box = driver.find_element(By.ID, "query")
        assert driver.switch_to.active_element == box  # keyboard first: the search box has focus
        k = driver.find_element(By.ID, "k")
        k.clear()
        k.send_keys("6")
        box.send_keys("a red circle", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 6)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert "6 results for" in driver.find_element(By.ID, "status").text
        driver.save_screenshot(str(tmp_path / "search.png"))
        assert (tmp_path / "search.png").stat().st_size > 10_000
        shots = os.environ.get("CLIPKIT_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "search.png", Path(shots) / "search.png")
        # from the keyboard: tab to the first result and press Enter -> images like it
        first = driver.find_element(By.CSS_SELECTOR, "#results button.result")
        first.send_keys(Keys.ENTER)
        wait.until(lambda d: "images like" in d.find_element(By.ID, "status").text)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 6)
        # a search with re-ranking on
        driver.find_element(By.ID, "rerank").click()
        box = driver.find_element(By.ID, "query")
        box.clear()
        box.send_keys("a blue square", Keys.ENTER)
        wait.until(lambda d: "re-ranked" in d.find_element(By.ID, "status").text)
        # an image pasted on the page (a screenshot, an image copied elsewhere): here a result's own picture
        driver.execute_script("""
            fetch(document.querySelector('#results img').src).then(r => r.blob()).then(blob => {
              const data = new DataTransfer();
              data.items.add(new File([blob], 'pasted.jpg', {type: 'image/jpeg'}));
              document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
            });""")
        wait.until(lambda d: "results for pasted.jpg" in d.find_element(By.ID, "status").text)
        # search by image file through the file picker
        driver.find_element(By.ID, "image-input").send_keys(str(served["photos"] / "train-000000011.jpg"))
        wait.until(lambda d: "results for train-" in d.find_element(By.ID, "status").text)
        _page_addresses(driver, wait, server)


def _page_addresses(driver, wait, server):
    """The address bar holds each search (a link opens it again), and Back / Forward step through them, the
    last answer shown being the last search's (Forward twice at once: the first answer comes late)."""
    from selenium.webdriver.common.by import By

    def showing(status: str, count: int):
        wait.until(lambda d: status in d.find_element(By.ID, "status").text and
                   len(d.find_elements(By.CSS_SELECTOR, "#results li")) == count)

    assert driver.current_url == server  # (a search by a file has no address)
    driver.back()  # the re-ranked text search
    showing("re-ranked", 6)
    assert driver.current_url.endswith("/?q=a+blue+square&k=6&rerank=1")
    assert driver.find_element(By.ID, "query").get_attribute("value") == "a blue square"
    driver.back()
    showing("images like train-", 6)  # (restored from the address, named once its item is among the results)
    assert "/?like=" in driver.current_url
    driver.back()
    showing("for “a red circle”", 6)
    driver.back()  # before the first search: the page as it opened
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#results li"))
    driver.forward()
    driver.forward()
    showing("images like", 6)
    driver.get(server + "?q=a%20green%20triangle&k=3")  # a link to a search
    showing("3 results for “a green triangle”", 3)
    driver.find_element(By.ID, "more").click()  # twice as many, in the address too
    showing("6 results for “a green triangle”", 6)
    assert driver.current_url.endswith("/?q=a+green+triangle&k=6")
    driver.get(server + "?q=a%20green%20triangle&k=500")  # fewer than that: all there are, no more to ask for
    wait.until(lambda d: "results for “a green triangle” in" in d.find_element(By.ID, "status").text)
    shown = len(driver.find_elements(By.CSS_SELECTOR, "#results li"))
    assert 6 < shown < 500 and not driver.find_element(By.ID, "more").is_displayed()



@pytest.mark.parametrize("rerank", [False, True])
@pytest.mark.parametrize("kind", ["text", "image"])
def test_server_and_library_answer_alike(client, served, kind, rerank):
    """One search path: the same hits and scores from `clipkit.search` and from POST /search."""
    photo = served["photos"] / "train-000000007.jpg"
    if kind == "text":
        query, body = "a small red circle", {"text": "a small red circle"}
    else:
        query, body = Path(photo), {"image": base64.b64encode(photo.read_bytes()).decode()}
    response = client.post("/search", json={**body, "k": 6, "rerank": rerank, "rerank_k": 10})
    try:
        expected = clipkit.search(query, served["index"], k=6, rerank=rerank, rerank_k=10)
    except ValueError as exc:  # what the library refuses, the server refuses with the library's message
        assert response.status_code == 400 and response.json()["detail"] == str(exc)
        return
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["item_id"] for r in results] == [h.id for h in expected]
    np.testing.assert_allclose([r["score"] for r in results], [h.score for h in expected], atol=RERANK_ATOL)
