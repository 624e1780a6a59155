"""Hostile folders, crash-safe and incremental indexing, damaged indexes: nothing good lost, nothing bad kept."""

import io
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipkit
from clipkit.cli import main
from clipkit.data.folder import scan_images
from clipkit.data.images import read_image
from clipkit.errors import BrokenIndexError
from clipkit.index import DB_FILE, Index
from conftest import draw_shape

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _exif_rotated(image: Image.Image, path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)


def build_hostile_folder(root: Path) -> tuple[set[Path], dict[Path, str]]:
    """(good image files that must be indexed once each, bad files -> the kind of skip expected)."""
    root.mkdir()
    (root / "sub" / "deeper").mkdir(parents=True)
    good: dict[str, Image.Image | None] = {}

    def put(name: str, image: Image.Image, fmt: str, **kwargs) -> Path:
        path = root / name
        image.save(path, format=fmt, **kwargs)
        good[name] = image
        return path

    base = draw_shape("red", "circle", (80, 60), seed=1)
    put("plain.jpg", base, "JPEG")
    put("UPPER CASE.JPG", draw_shape("blue", "square", (64, 64), seed=2), "JPEG")
    put("sub/b.PNG", draw_shape("green", "triangle", (50, 70), seed=3), "PNG")
    put("cmyk.jpg", draw_shape("yellow", "circle", seed=4).convert("CMYK"), "JPEG")
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    put("gray16.png", gray16, "PNG")
    palette = draw_shape("purple", "square", seed=5).convert("P", palette=Image.ADAPTIVE, colors=16)
    put("palette transparent.png", palette, "PNG", transparency=0)
    put("rgba.png", draw_shape("orange", "circle", seed=6).convert("RGBA"), "PNG")
    put("gray.png", draw_shape("red", "triangle", seed=7).convert("L"), "PNG")
    frames = [draw_shape("blue", "circle", seed=8), draw_shape("green", "square", seed=9)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(root / "sub/animated.webp", save_all=True, append_images=frames[1:], duration=100)
    good["animated.gif"] = good["sub/animated.webp"] = frames[0]
    _exif_rotated(draw_shape("yellow", "triangle", (96, 48), seed=10), root / "exif rotated.jpg")
    good["exif rotated.jpg"] = None
    put("tall.png", draw_shape("red", "square", (8, 3000), seed=11), "PNG")
    put("wide.png", draw_shape("blue", "triangle", (3000, 8), seed=12), "PNG")
    put("ünïcødé 写真.png", draw_shape("green", "circle", seed=13), "PNG")
    put("new\nline.jpg", draw_shape("orange", "square", seed=14), "JPEG")
    put("sub/deeper/with spaces & 'quotes'.webp", draw_shape("purple", "circle", seed=15), "WEBP")

    bad = {}
    (root / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    jpeg = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    bad["truncated.jpg"] = "truncated or corrupt"
    (root / "page.jpg").write_text("<!doctype html><html><body>404 Not Found</body></html>")
    bad["page.jpg"] = "not an image"
    (root / "sub/notes.png").write_text("just some text")
    bad["sub/notes.png"] = "not an image"
    (root / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    bad["bomb.png"] = "too many pixels"
    if not IS_ROOT:  # root reads any file regardless of its mode
        (root / "locked.jpg").write_bytes(jpeg)
        (root / "locked.jpg").chmod(0)
        bad["locked.jpg"] = "permission denied"

    # never indexed and never reported: hidden, AppleDouble, excluded, not image names, second names
    (root / ".hidden.jpg").write_bytes(jpeg)
    (root / "._plain.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(jpeg)
    (root / "cache").mkdir()
    (root / "cache" / "c.jpg").write_bytes(jpeg)
    (root / "draft.tmp.png").write_bytes(jpeg)
    (root / "readme.txt").write_text("not an image name")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    (root / "alias.jpg").symlink_to(root / "plain.jpg")  # a second name for plain.jpg
    (root / "dangling.jpg").symlink_to(root / "nowhere.jpg")  # (a folder's sync says it: a link to nothing)
    good_paths = {(root / name).resolve() if name != "new\nline.jpg" else root.resolve() / name for name in good}
    return good_paths, {root.resolve() / name: kind for name, kind in bad.items()}


EXCLUDE = ["cache", "*.tmp.png"]


def said_skipped(root: Path, bad: dict) -> dict:
    """What a folder's sync skips: the bad files, and the link to nothing, which is never opened (a scan leaves it
    out without a word)."""
    return {**bad, root.resolve() / "dangling.jpg": "not a regular file"}


@pytest.fixture
def hostile(tmp_path):
    good, bad = build_hostile_folder(tmp_path / "photos")
    yield tmp_path / "photos", good, bad
    locked = tmp_path / "photos" / "locked.jpg"
    if locked.exists():
        locked.chmod(0o644)


def test_scan_lists_each_good_file_once(hostile):
    root, good, bad = hostile
    found = scan_images(root.resolve(), exclude=EXCLUDE)
    assert len(found) == len(set(found))
    assert set(found) == good | set(bad)  # bad files have image names: they are found, then skipped when read


def test_hostile_folder_indexes_every_good_image_once(hostile, tiny_model):
    root, good, bad = hostile
    index = Index(tiny_model.dim, model=tiny_model)
    report = index.sync_folder(root, tiny_model, batch_size=4, exclude=EXCLUDE)
    assert sorted(index.ids()) == sorted(str(p) for p in good)
    bad = said_skipped(root, bad)
    assert {Path(p) for p, _ in report.skipped} == set(bad)
    expected_kinds: dict[str, int] = {}
    for kind in bad.values():
        expected_kinds[kind] = expected_kinds.get(kind, 0) + 1
    assert report.skipped_kinds == expected_kinds
    assert report.added == len(good)
    # the bomb was refused from its header, not decoded
    assert "decompression bomb" in dict(report.skipped)[str(root.resolve() / "bomb.png")]
    assert "a link to nothing" in dict(report.skipped)[str(root.resolve() / "dangling.jpg")]
    again = index.sync_folder(root, tiny_model, exclude=EXCLUDE)
    assert again.embedded == 0 and again.unchanged == len(good) and len(again.skipped) == len(bad)


def test_image_modes_exif_and_animation_are_read_as_shown(hostile, tiny_model):
    root, _, _ = hostile
    rotated = read_image(root / "exif rotated.jpg")
    assert rotated.size == (48, 96)  # orientation 6 applied: the stored 96x48 image turns upright
    for name in ("animated.gif", "sub/animated.webp"):
        with Image.open(root / name) as animation:
            assert animation.n_frames == 2
            frames = []
            for n in range(2):
                animation.seek(n)
                frames.append(np.asarray(animation.convert("RGB"), dtype=np.int16))
        first = np.asarray(read_image(root / name), dtype=np.int16)
        assert np.abs(first - frames[0]).mean() < np.abs(first - frames[1]).mean() / 5  # the first frame
    gray16 = np.asarray(read_image(root / "gray16.png"))
    assert gray16.min() < 10 and gray16.max() > 240  # scaled to 8 bits, not clipped to white
    transparent = read_image(root / "palette transparent.png")
    assert transparent.mode == "RGB"
    cmyk = clipkit.encode([root / "cmyk.jpg"], model=tiny_model)
    assert np.isfinite(cmyk).all()


def test_a_photo_past_the_pixel_limit_is_indexed_from_its_reduced_jpeg_decoding(tmp_path, tiny_model, monkeypatch):
    """Pillow refuses images past 89 MP, but a 100-200 MP JPEG (medium-format cameras, phones' 200 MP mode,
    panoramas) is decoded at up to 1/8 scale for a model that reads 224 pixels: the limit applies to what is
    decoded. A PNG, or a full decode, that large is still refused. (The limit is lowered here: the same rule at
    a test's size.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle", (640, 480)).save(photos / "camera.jpg", quality=90)  # 307,200 px: 6x the limit
    draw_shape("red", "circle", (640, 480)).save(photos / "drawing.png")
    draw_shape("red", "circle", (2000, 1700)).save(photos / "too-big.jpg")  # 3.4 MP: past 64x, refused unread
    assert main(["index", str(photos), "--index", str(tmp_path / "ix")]) == 0
    index = Index.load(tmp_path / "ix")
    assert [Path(i).name for i in index.ids()] == ["camera.jpg"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    np.testing.assert_allclose(index.embeddings(index.ids()), clipkit.encode([photos / "camera.jpg"], model="clipkit-demo"),
                               atol=1e-5)  # the same draft decoding as without a limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(ValueError, match="decompression bomb"):
        clipkit.encode([photos / "camera.jpg"], model=tiny_model, draft=False)
    from fastapi.testclient import TestClient

    from clipkit.serve import ServeConfig, create_app

    size = (photos / "camera.jpg").stat().st_size  # a request may be smaller than an indexed photo
    with TestClient(create_app(index, config=ServeConfig(max_body_bytes=size // 2))) as client:
        key = index.keys(index.ids())[0]  # the photo as it is, and a thumbnail from its reduced decoding
        assert client.get(f"/image/{key}").content == (photos / "camera.jpg").read_bytes()
        thumbnail = client.get(f"/thumbnail/{key}?size=64")
        assert thumbnail.status_code == 200 and max(Image.open(io.BytesIO(thumbnail.content)).size) == 64
    with TestClient(create_app(index, config=ServeConfig(max_image_bytes=size // 2))) as client:
        assert "larger than" in client.get(f"/image/{key}").json()["detail"]
    from clipkit import rerankers

    monkeypatch.setattr(rerankers, "REDUCED_SIDE", 64)  # (1,024 at 89 MP: the same rule at this size)
    hit = clipkit.search("a red circle", index, k=1, rerank=True)[0]  # re-ranked from its reduced decoding
    assert Path(hit.path).name == "camera.jpg" and "itc_score" in hit.metadata


def test_files_that_vanish_are_skipped(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(6):
        draw_shape("red", "circle", seed=i).save(root / f"{i}.png")
    from clipkit.index import sync

    original = sync.plan_folder

    def plan_then_vanish(store, folder, **kwargs):
        plan = original(store, folder, **kwargs)
        (root / "2.png").unlink()  # listed and stat'ed, gone before it is decoded
        return plan

    monkeypatch.setattr(sync, "plan_folder", plan_then_vanish)
    index = Index(tiny_model.dim, model=tiny_model)
    report = index.sync_folder(root, tiny_model)
    assert report.skipped_kinds == {"vanished": 1} and len(index) == 5
    monkeypatch.setattr(sync, "plan_folder", original)
    assert index.sync_folder(root, tiny_model).embedded == 0


def test_a_folder_s_plan_holds_the_same_memory_for_3_times_the_files(tmp_path):
    """Planning a folder listed every file in memory (335 bytes a file, 600 on a re-run: 6 GB for ten million);
    the plan now lists them into a temporary database on disk, so its peak Python memory for 36,000 files is
    that for 12,000 (a batch of rows at a time), and its lists read back complete and in path order."""
    import tracemalloc

    peaks, paths = [], []
    for size in (12_000, 36_000):
        photos = tmp_path / str(size)
        paths = [photos / f"d{i // 1000:02d}" / f"image_{i:06d}.jpg" for i in range(size)]
        for path in paths:
            path.parent.mkdir(exist_ok=True, parents=True)
            path.touch()
        tracemalloc.start()
        with Index(8).plan_folder(photos) as plan:
            assert len(plan.new) == size
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            assert [p for p, _ in plan.new] == sorted(map(str, paths))
            assert plan.new[0][1] == (0, paths[0].stat().st_mtime) and not plan.changed and not plan.gone
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < 8e6, peaks  # (the old plan: 12 MB for 36,000)


def test_a_file_with_several_names_is_planned_once_by_its_first_real_name(tmp_path):
    """Hard links and symlinks name one file: the plan keeps a real name before a symlink's, then the first in
    path order, whichever it met first (the listing goes folder by folder)."""
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    draw_shape("red", "circle").save(photos / "z.png")
    os.link(photos / "z.png", photos / "a" / "y.png")  # a second real name, earlier in path order
    (photos / "0.png").symlink_to(photos / "z.png")  # a symlink, first of all
    draw_shape("blue", "square").save(photos / "b.png")
    with Index(8).plan_folder(photos) as plan:
        assert [Path(p).relative_to(photos.resolve()).as_posix() for p, _ in plan.new] == ["a/y.png", "b.png"]
    assert scan_images(photos.resolve()) == [photos.resolve() / "a" / "y.png", photos.resolve() / "b.png"]


def test_a_folder_is_embedded_a_chunk_of_files_at_a_time(image_folder, tiny_model, monkeypatch):
    """The files to embed are read back from the plan a chunk at a time (one engine call each: a Ray engine
    starts its actors once a chunk); the index is the one a single call gives."""
    from clipkit.index import sync

    whole = Index(tiny_model.dim, model=tiny_model)
    whole.sync_folder(image_folder, tiny_model)
    calls = []

    def engine(paths, model, **options):
        calls.append(len(paths))
        from clipkit.encode import embed_image_files

        yield from embed_image_files(paths, model, **options)

    monkeypatch.setattr(sync, "FOLDER_CHUNK", 5)
    chunked = Index(tiny_model.dim, model=tiny_model)
    report = chunked.sync_folder(image_folder, tiny_model, engine=engine)
    assert calls == [5, 5, 3] and report.added == 12 and len(report.skipped) == 1  # (13 files: one broken)
    assert sorted(chunked.ids()) == sorted(whole.ids())
    np.testing.assert_allclose(chunked.embeddings(sorted(whole.ids())), whole.embeddings(sorted(whole.ids())),
                               atol=1e-6)


def test_incremental_add_change_delete_rename(tmp_path, tiny_model):
    root = tmp_path / "photos"
    (root / "album").mkdir(parents=True)
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        draw_shape(colour, "circle", seed=i).save(root / f"{colour}.png")
    index = Index(tiny_model.dim, model=tiny_model)
    assert index.sync_folder(root, tiny_model).added == 4
    blue_vector = index.embeddings([str((root / "blue.png").resolve())])[0]

    draw_shape("purple", "square", seed=9).save(root / "purple.png")  # added
    draw_shape("red", "triangle", seed=9).save(root / "red.png")  # changed content
    os.utime(root / "red.png", (1_000_000, 1_000_000))
    (root / "green.png").unlink()  # deleted
    (root / "blue.png").rename(root / "album" / "blue renamed.png")  # moved + renamed
    before = (sorted(index.ids()), index.generation, index.embeddings().tobytes())
    plan = index.plan_folder(root)
    assert [Path(p).name for p, _ in plan.new] == ["purple.png"]
    assert [Path(p).name for p, _ in plan.changed] == ["red.png"]
    assert [Path(old).name for old, _, _ in plan.moved] == ["blue.png"] and [Path(g).name for g in plan.gone] == [
        "green.png"]
    assert (sorted(index.ids()), index.generation, index.embeddings().tobytes()) == before  # planning changed nothing

    report = index.sync_folder(root, tiny_model)
    assert (report.added, report.updated, report.removed, report.moved, report.unchanged) == (1, 1, 1, 1, 1)
    names = sorted(Path(i).name for i in index.ids())
    assert names == ["blue renamed.png", "purple.png", "red.png", "yellow.png"]
    moved_id = str((root / "album" / "blue renamed.png").resolve())
    np.testing.assert_array_equal(index.embeddings([moved_id])[0], blue_vector)  # kept, not re-embedded
    assert index.get([moved_id])[0]["path"] == moved_id
    expected = clipkit.encode([root / "red.png"], model=tiny_model)[0]
    np.testing.assert_allclose(index.embeddings([str((root / "red.png").resolve())])[0], expected, atol=1e-5)
    # a copy (not a move) of an indexed file is a new item of its own
    (root / "yellow copy.png").write_bytes((root / "yellow.png").read_bytes())
    assert index.sync_folder(root, tiny_model).added == 1 and len(index) == 5


def test_cli_check_changes_nothing_and_skipped_log(hostile, tmp_path, tiny_ckpt, capsys):
    root, good, bad = hostile
    index_path = tmp_path / "photos.clipkit"
    common = ["--exclude", "cache", "--exclude", "*.tmp.png"]
    assert main(["index", str(root), "--index", str(index_path), "--check", *common]) == 0
    assert f"{len(good) + len(bad)} image file(s) would be indexed" in capsys.readouterr().out
    assert not index_path.exists()
    log = tmp_path / "skipped.jsonl"
    assert main(["index", str(root), "--index", str(index_path), "--model", "clipkit-tiny", "--pretrained",
                 str(tiny_ckpt), "--skipped-log", str(log), *common]) == 0
    out = capsys.readouterr().out
    bad = said_skipped(root, bad)
    assert f"indexed {len(good)} image(s)" in out and f"{len(bad)} skipped (" in out
    assert "2 not an image" in out and "1 empty file" in out and "1 too many pixels" in out
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {Path(entry["path"]) for entry in logged} == set(bad) and all(entry["reason"] for entry in logged)

    (root / "plain.jpg").unlink()

    def state():
        index = Index.load(index_path)
        return (sorted(index.ids()), index.generation, (index_path / "config.json").read_bytes(),
                sorted((p.name, p.read_bytes()) for p in (index_path / "vectors").iterdir()))

    before = state()
    assert main(["index", str(root), "--index", str(index_path), "--check", *common]) == 0
    out = capsys.readouterr().out
    assert "remove 1" in out and "removed: " in out and state() == before
    # a hit whose file name holds a newline still prints as valid JSON
    assert main(["search", "an orange square", "--index", str(index_path), "-k", str(len(good)), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert str(root.resolve() / "new\nline.jpg") in {h["id"] for h in hits}


def test_exclude_globs_are_remembered_for_the_folder(tmp_path, tiny_ckpt, capsys):
    """`clipkit index photos --exclude cache` and later `clipkit index photos` (a cron job) indexed the cache on
    the second run; the globs are now remembered for the folder (said in the summary, used by --check), given
    ones replace them, --no-exclude forgets them."""
    root = tmp_path / "photos"
    (root / "cache").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue"), ("cache/t1.png", "green"), ("cache/t2.png", "yellow")):
        draw_shape(colour, "circle").save(root / name)
    index_path = tmp_path / "ix"
    model = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt)]
    assert main(["-q", "index", str(root), "--index", str(index_path), "--exclude", "cache", *model]) == 0
    assert main(["index", str(root), "--index", str(index_path)]) == 0
    out = capsys.readouterr().out
    assert "0 new" in out and "left out what matches --exclude 'cache', as remembered" in out
    assert sorted(Path(i).name for i in Index.load(index_path).ids()) == ["a.png", "b.png"]
    assert main(["index", str(root), "--index", str(index_path), "--check"]) == 0
    assert "would embed 0 new" in capsys.readouterr().out
    assert Index.load(index_path).excludes(root) == ["cache"]
    assert main(["roots", "--index", str(index_path)]) == 0 and main(["info", str(index_path)]) == 0
    assert capsys.readouterr().out.count(f"{root.resolve()}  (leaving out: cache)") == 2
    root.rename(tmp_path / "renamed")  # the folder moves: its globs go with it, before the cache is embedded
    assert main(["index", str(tmp_path / "renamed"), "--index", str(index_path), "--check"]) == 0
    assert "would embed 0 new and re-embed 0 changed image(s), move 2" in capsys.readouterr().out
    assert main(["index", str(tmp_path / "renamed"), "--index", str(index_path)]) == 0
    assert "indexed 0 image(s) (0 new, 0 changed), 2 moved" in capsys.readouterr().out
    (tmp_path / "renamed").rename(root)
    assert main(["index", str(root), "--index", str(index_path)]) == 0
    assert "indexed 0 image(s) (0 new, 0 changed), 2 moved" in capsys.readouterr().out
    assert main(["-q", "index", str(root), "--index", str(index_path), "--exclude", "b.png"]) == 0  # replaces
    assert sorted(Path(i).name for i in Index.load(index_path).ids()) == ["a.png", "t1.png", "t2.png"]
    assert main(["-q", "index", str(root), "--index", str(index_path), "--no-exclude"]) == 0
    assert len(Index.load(index_path)) == 4 and Index.load(index_path).excludes(root) == []
    assert main(["index", str(root), "--index", str(index_path), "--no-exclude", "--exclude", "x"]) == 2


def test_a_gone_folder_with_globs_makes_other_folders_planned_once_a_run(tmp_path, tiny_model, monkeypatch):
    """A gone folder indexed with --exclude (an unplugged drive) made every later run of any other folder plan it
    twice (once to see whether the gone folder's files had moved there); only a folder new to the index is."""
    import clipkit.index.sync as sync

    usb, home = tmp_path / "usb", tmp_path / "home"
    for folder, colour in ((usb, "red"), (home, "blue")):
        (folder / "cache").mkdir(parents=True)
        draw_shape(colour, "circle").save(folder / "a.png")
        draw_shape(colour, "square").save(folder / "cache" / "t.png")
    index = Index(tiny_model.dim, model=tiny_model)
    index.sync_folder(usb, exclude=["cache"], progress=False)
    usb.rename(tmp_path / "unplugged")
    plan_folder, plans = sync.plan_folder, []
    monkeypatch.setattr(sync, "plan_folder", lambda *a, **k: plans.append(str(a[1])) or plan_folder(*a, **k))
    index.sync_folder(home, progress=False)  # new to the index: planned once more, to look for the gone files
    assert len(plans) == 2 and len(index) == 3
    plans.clear()
    for _ in range(2):
        assert index.sync_folder(home, progress=False).unchanged == 2
    assert len(plans) == 2  # once a run
    (tmp_path / "unplugged").rename(tmp_path / "usb2")  # the drive back at another mount point: its globs go too
    plans.clear()
    report = index.sync_folder(tmp_path / "usb2", progress=False)
    assert (report.moved, report.added, len(plans)) == (1, 0, 2) and index.excludes(tmp_path / "usb2") == ["cache"]


def test_sigkill_mid_index_then_rerun_equals_a_clean_run(tmp_path, tiny_ckpt):
    from clipkit.data.synthetic import write_synthetic

    photos = tmp_path / "photos"
    write_synthetic(photos, 600, seed=5, layout="folder", workers=1, progress=False)
    args = ["--model", "clipkit-tiny", "--pretrained", str(tiny_ckpt), "--batch-size", "2", "--workers", "1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    killed = tmp_path / "killed.clipkit"
    command = [sys.executable, "-m", "clipkit", "-q", "index", str(photos), "--index", str(killed), *args]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    count = 0
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline:
        if (killed / DB_FILE).exists():
            try:
                with sqlite3.connect(f"file:{killed / DB_FILE}?mode=ro", uri=True) as db:
                    count = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            except sqlite3.Error:
                count = 0
            if count >= 40:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert 40 <= count < 600

    rerun = subprocess.run([sys.executable, "-m", "clipkit", "index", str(photos), "--index", str(killed), *args],
                           env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    embedded = int(rerun.stdout.split("indexed ")[1].split()[0])
    assert embedded <= 600 - count + 2  # resumed: at most the batch in flight is redone

    clean = tmp_path / "clean.clipkit"
    assert main(["-q", "index", str(photos), "--index", str(clean), *args]) == 0
    resumed, fresh = Index.load(killed), Index.load(clean)
    assert sorted(resumed.ids()) == sorted(fresh.ids()) and len(resumed) == 600
    ids = fresh.ids()
    np.testing.assert_allclose(resumed.embeddings(ids), fresh.embeddings(ids), atol=1e-5)


def test_truncated_store_is_refused_with_advice(tmp_path, tiny_model):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(40):
        draw_shape("red", "circle", (32, 32), seed=i).save(photos / f"{i}.png")
    index = Index(tiny_model.dim, model=tiny_model)
    index.save(tmp_path / "ix")
    index.sync_folder(photos, tiny_model)
    index.save()
    index.close()
    db_path = tmp_path / "ix" / DB_FILE
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    data = db_path.read_bytes()
    db_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BrokenIndexError, match="truncated|damaged"):
        Index.load(tmp_path / "ix")
    assert main(["search", "red", "--index", str(tmp_path / "ix")]) == 2


def test_unreadable_file_is_skipped_as_permission_denied(tmp_path, tiny_model, monkeypatch):
    """chmod 000 does not stop root (CI runs as root), so the open() of one file is made to fail."""
    import builtins

    import clipkit.data.images as images

    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        draw_shape("blue", "square", seed=i).save(root / f"{i}.jpg")
    locked = str(root / "2.jpg")

    def guarded_open(path, *args, **kwargs):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", guarded_open, raising=False)
    index = Index(tiny_model.dim, model=tiny_model)
    report = index.sync_folder(root, tiny_model)
    assert report.skipped_kinds == {"permission denied": 1} and len(index) == 3
    assert "permission denied" in report.skipped[0][1]


def test_max_pixels_sets_the_limit_for_this_run_and_ray_s_actors(tmp_path, tiny_ckpt, tiny_model, capsys, monkeypatch):
    """An image past Pillow's pixel limit is skipped saying how to raise it; `--max-pixels` raises (or lowers) the
    limit for the run, a later run with a higher one embeds what was skipped, and a Ray actor gets the driver's."""
    from clipkit.encode_ray import _Embedder

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # (restored after the test)
    photos = tmp_path / "photos"
    photos.mkdir()
    draw_shape("red", "circle", (64, 64)).save(photos / "big.png")  # 4,096 pixels
    draw_shape("blue", "square", (30, 30)).save(photos / "small.png")  # 900
    common = ["index", str(photos), "--index", str(tmp_path / "ix"), "--model", "clipkit-tiny", "--pretrained",
              str(tiny_ckpt)]
    assert main([*common, "--max-pixels", "0.002"]) == 0
    captured = capsys.readouterr()
    assert "indexed 1 image(s)" in captured.out and "1 too many pixels" in captured.out
    assert "--max-pixels" in captured.err and "big.png" in captured.err
    assert main([*common, "--max-pixels", "0.005"]) == 0
    assert "indexed 1 image(s) (1 new" in capsys.readouterr().out
    assert len(Index.load(tmp_path / "ix")) == 2
    assert main([*common, "--max-pixels", "-1"]) == 2
    assert "megapixels" in capsys.readouterr().err

    actor = _Embedder(tiny_model.info, threads=1, pixel_limit=2000)
    out = actor({"position": np.arange(2), "path": np.array([str(photos / "big.png"), str(photos / "small.png")])})
    assert list(out["kind"]) == ["too many pixels", ""] and np.abs(out["vector"][1]).sum() > 0
