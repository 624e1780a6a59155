"""Search within a folder (`under=`, `clipkit search --under FOLDER`): the items whose file lies there, against
numpy brute force over exactly those items."""

import json

import numpy as np
import pytest

import clipkit
from clipkit.cli import main
from clipkit.index import Index


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def photos(tmp_path):
    """3,000 items in three folders (one nested in another), saved and loaded: vectors, ids, the index."""
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((3000, 32)))
    folders = ["/photos/2023/rome", "/photos/2023", "/photos/2024"]
    ids = [f"{folders[i % 3]}/{i:05d}.jpg" for i in range(3000)]
    index = Index.from_embeddings(vectors, ids=ids, metadata=[{"path": i} for i in ids])
    index.save(tmp_path / "ix")
    return vectors, np.array(ids), Index.load(tmp_path / "ix")


def brute_force(vectors, ids, queries, k, prefix):
    inside = np.array([i.startswith(prefix) for i in ids])
    scores = queries @ vectors[inside].T
    order = np.argsort(-scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), ids[inside][order]


@pytest.mark.parametrize("scan_limit", [200_000, 0])  # (read row by row; through the structure, deeper and deeper)
def test_under_a_folder_equals_brute_force_over_its_items(photos, monkeypatch, scan_limit):
    import clipkit.index.subset as subset

    monkeypatch.setattr(subset, "SCAN_LIMIT", scan_limit)
    vectors, ids, index = photos
    queries = unit(np.random.default_rng(9).standard_normal((20, 32)))
    for folder, prefix in [("/photos/2023", "/photos/2023/"), ("/photos/2023/rome/", "/photos/2023/rome/"),
                           ("/photos/2024", "/photos/2024/")]:
        scores, found = index.search(queries, 10, under=folder)
        expected_scores, expected = brute_force(vectors, ids, queries, 10, prefix)
        assert (found == expected).all()
        np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
    assert index.count_under("/photos/2023") == 2000 and index.count_under("/photos/2023/rome") == 1000


def test_under_an_ann_structure_keeps_to_the_folder(photos, monkeypatch):
    """Past SCAN_LIMIT, an approximate structure is searched deeper until each query has k of the folder's items."""
    import clipkit.index.subset as subset

    monkeypatch.setattr(subset, "SCAN_LIMIT", 0)
    vectors, ids, index = photos
    index.set_index_type("IVF16,Flat")
    queries = unit(np.random.default_rng(5).standard_normal((20, 32)))
    _, found = index.search(queries, 10, under="/photos/2023/rome")
    assert all(i.startswith("/photos/2023/rome/") for i in found.ravel())
    _, expected = brute_force(vectors, ids, queries, 10, "/photos/2023/rome/")
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, expected)]) >= 0.8


def test_a_folder_s_items_are_listed_once_until_the_index_changes(photos, monkeypatch, tmp_path):
    """Listing a folder's items took ~0.9 s a search at a million; they are kept while the index is unchanged
    (another writer's change is seen at once), up to FOLDER_KEYS_KEPT keys."""
    import clipkit.index.subset as subset

    vectors, ids, index = photos
    listed, real = [], subset.keys_under
    monkeypatch.setattr(subset, "keys_under", lambda folder, store: listed.append(folder) or real(folder, store))
    for _ in range(3):
        index.search(vectors[:2], 5, under="/photos/2024")
    assert index.count_under("/photos/2024") == 1000 and listed == ["/photos/2024"]
    writer = Index.load(tmp_path / "ix")
    new = "/photos/2024/new.jpg"
    writer.add(unit(vectors[:1] + 0.01), ids=[new], metadata=[{"path": new}])
    assert index.search(vectors[:1], 1, under="/photos/2024")[1][0].tolist() == [new]
    writer.remove([new])
    assert index.count_under("/photos/2024") == 1000
    assert new not in index.search(vectors[:1], 5, under="/photos/2024")[1]
    assert listed == ["/photos/2024"] * 3
    monkeypatch.setattr(subset, "FOLDER_KEYS_KEPT", 1500)  # 2023's 2,000 items are past it: not kept, nor 2024's
    for folder in ("/photos/2024", "/photos/2023", "/photos/2023", "/photos/2024"):
        index.count_under(folder)
    assert listed == ["/photos/2024"] * 3 + ["/photos/2023"] * 2 + ["/photos/2024"]


def test_under_a_file_a_gone_folder_and_nothing(photos):
    vectors, ids, index = photos
    scores, found = index.search(vectors[:1], 3, under=ids[0])
    assert found[0].tolist() == [ids[0], None, None] and np.isneginf(scores[0, 1:]).all()
    for nowhere in ("/photos/2025", "/photos/202"):  # (a prefix of a name is not a folder)
        with pytest.raises(ValueError, match="no indexed item lies under"):
            index.search(vectors[:1], 3, under=nowhere)
        assert index.count_under(nowhere) == 0
    with pytest.raises(ValueError, match="under must be a folder"):
        index.search(vectors[:1], 3, under="  ")


def test_search_and_the_cli_under_a_folder(image_folder, tmp_path, tiny_ckpt, capsys):
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(image_folder), "--index", ix, "--model", "clipkit-tiny", "--pretrained",
                 str(tiny_ckpt)]) == 0
    nested = image_folder / "nested"
    hits = clipkit.search("a red circle", ix, k=20, under=nested)
    inside = sorted(str(p.resolve()) for p in nested.rglob("*") if p.is_file())
    assert sorted(h.path for h in hits) == inside and len(inside) == 8
    everything = clipkit.search("a red circle", ix, k=20)
    assert [h.id for h in hits] == [h.id for h in everything if h.path in inside]  # the same order, the same scores
    assert main(["search", "a red circle", "a blue square", "--index", ix, "--under", str(nested / "deeper"),
                 "--json", "-k", "20"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(a["hits"]) for a in answers] == [4, 4]
    assert all("/nested/deeper/" in h["path"] for a in answers for h in a["hits"])
    assert main(["search", "a red circle", "--index", ix, "--under", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no indexed item lies under" in err and "clipkit roots" in err


def test_the_server_searches_under_a_folder(image_folder, tiny_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipkit.serve import create_app

    index = Index.from_folder(image_folder, model=tiny_model)
    nested = str((image_folder / "nested").resolve())
    with TestClient(create_app({"photos": index})) as client:
        answer = client.post("/search", json={"text": "a red circle", "k": 20, "under": nested})
        assert answer.status_code == 200
        paths = [hit["path"] for hit in answer.json()["results"]]
        assert len(paths) == 8 and all(path.startswith(nested + "/") for path in paths)
        with (image_folder / "red circle.png").open("rb") as picture:
            form = client.post("/search", files={"image": ("q.png", picture, "image/png")},
                               data={"under": nested + "/deeper", "k": "20"})
        assert form.status_code == 200 and len(form.json()["results"]) == 4
        for under in ("/nowhere", "a\x00b"):
            refused = client.post("/search", json={"text": "a red circle", "under": under})
            assert refused.status_code == 400, refused.text
        assert "no indexed item lies under /nowhere" in client.post(
            "/search", json={"text": "x", "under": "/nowhere"}).json()["detail"]


def test_the_page_narrows_a_search_to_a_result_s_folder(image_folder, tmp_path):
    """In Chromium: "in this folder" under a result searches again among that folder's images only (the
    status says where); "all folders" searches everything again."""
    pytest.importorskip("fastapi")
    from conftest import chromium, running_server

    ix = tmp_path / "ix"
    assert main(["-q", "index", str(image_folder), "--index", str(ix)]) == 0
    deeper = str((image_folder / "nested" / "deeper").resolve())
    with running_server("--index", str(ix)) as url, chromium() as driver:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(driver, 60)
        driver.get(url)
        wait.until(lambda d: "images indexed" in d.find_element(By.ID, "status").text)
        driver.find_element(By.ID, "query").send_keys("a red circle", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 12)
        links = driver.execute_script(
            "return [...document.querySelectorAll('#results button.folder')].map(b => b.title)")
        position = next(i for i, title in enumerate(links) if title.endswith(deeper + " only"))
        driver.find_elements(By.CSS_SELECTOR, "#results button.folder")[position].click()
        wait.until(lambda d: f"in {deeper} in" in d.find_element(By.ID, "status").text)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results li")) == 4
        assert driver.find_element(By.ID, "folder-name").text == deeper
        assert not driver.find_elements(By.CSS_SELECTOR, "#results button.folder")  # (all are in that folder)
        driver.find_element(By.ID, "folder-clear").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results li")) == 12)
        assert not driver.find_element(By.ID, "folder-field").is_displayed()


def test_under_a_shard_or_a_folder_of_shards(tmp_path):
    """Items of webdataset shards lie where their shard lies (what `clipkit remove` takes too)."""
    from clipkit.data.synthetic import write_synthetic

    shards = write_synthetic(tmp_path / "shards", 30, seed=8, split="test", maxcount=10, workers=1, progress=False)
    ix = str(tmp_path / "ix")
    assert main(["-q", "index", str(shards[0].parent), "--index", ix]) == 0
    index = Index.load(ix)
    hits = clipkit.search("a red circle", index, k=30, under=shards[1])
    assert len(hits) == 10 and all(h.id.startswith(f"{shards[1]}#") for h in hits)
    assert index.count_under(shards[0].parent) == 30 and index.count_under(shards[2]) == 10


@pytest.mark.parametrize("scan_limit", [200_000, 0])
def test_under_a_folder_with_items_of_several_vectors(monkeypatch, scan_limit):
    """BLIP-2's items (several vectors, scored by the best): within a folder as everywhere, equal to numpy."""
    import clipkit.index.subset as subset

    monkeypatch.setattr(subset, "SCAN_LIMIT", scan_limit)
    rng = np.random.default_rng(4)
    base = rng.standard_normal((600, 3, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=2, keepdims=True)
    ids = [f"/lib/{'a' if i % 4 else 'b'}/{i}.jpg" for i in range(600)]
    index = Index.from_embeddings(base, ids=ids, metadata=[{"path": i} for i in ids])
    queries = unit(rng.standard_normal((10, 16)))
    inside = [i for i, name in enumerate(ids) if name.startswith("/lib/b/")]
    scores = np.einsum("qd,nmd->qnm", queries, base[inside]).max(axis=2)
    order = np.argsort(-scores, axis=1)[:, :5]
    found_scores, found = index.search(queries, 5, under="/lib/b")
    assert found.tolist() == [[ids[inside[j]] for j in row] for row in order]
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, order, 1), atol=1e-5)


def test_a_deep_search_past_its_memory_bound_reads_the_folder_s_rows(photos, monkeypatch):
    """Past SCAN_LIMIT, a structure search deeper than DEEP_CELLS results at once is not made: the folder's rows
    are read instead, exact, in bounded memory."""
    import clipkit.index.subset as subset

    vectors, ids, index = photos
    monkeypatch.setattr(subset, "SCAN_LIMIT", 0)
    monkeypatch.setattr(subset, "DEEP_CELLS", 50)
    deep = []
    real = index._structure.search
    monkeypatch.setattr(index._structure, "search", lambda q, depth: deep.append(depth) or real(q, depth))
    queries = unit(np.random.default_rng(2).standard_normal((20, 32)))
    scores, found = index.search(queries, 10, under="/photos/2024")
    expected_scores, expected = brute_force(vectors, ids, queries, 10, "/photos/2024/")
    assert deep == [] and (found == expected).all()
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)
