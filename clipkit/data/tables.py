"""Caption tables read in bounded memory: the rows of a CSV / TSV / JSONL / parquet table (or of a .txt list
of image files) grouped by image into a private temporary SQLite database, which SQLite keeps on disk past a
small page cache and deletes when it is closed. A table of any size is read once, streamed, then looked up
by image; nothing holds it in memory.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from clipkit._io import batches, temp_space
from clipkit.data.urls import parquet_file, table_columns, table_records, table_suffix

_CHUNK = 10_000  # rows written per statement batch


class TableRows:
    """A caption table's rows by image: `image in rows`, `rows.get(image)` (its captions, in the table's
    order; [] for an image listed without any), iteration over the images (in the order the table first names
    them), `items()` (image, captions) pairs in that order, `len()` images. Images are absolute paths."""

    def __init__(self, rows: Iterable[tuple[str, list[str]]] = ()):
        self._db = sqlite3.connect("", check_same_thread=False)  # "": a private temporary database on disk
        self._db.executescript("CREATE TABLE images (n INTEGER PRIMARY KEY, image TEXT UNIQUE NOT NULL);"
                               "CREATE TABLE captions (image INTEGER NOT NULL, caption TEXT NOT NULL);")
        for chunk in batches(rows, _CHUNK):
            self._db.executemany("INSERT OR IGNORE INTO images(image) VALUES (?)", ((image,) for image, _ in chunk))
            self._db.executemany("INSERT INTO captions(image, caption) SELECT n, ? FROM images WHERE image = ?",
                                 ((caption, image) for image, texts in chunk for caption in texts))
        self._db.execute("CREATE INDEX captions_of_image ON captions(image)")
        self._db.commit()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0]

    def __contains__(self, image: object) -> bool:
        return self._db.execute("SELECT 1 FROM images WHERE image = ?", (str(image),)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        return (image for image, in self._db.execute("SELECT image FROM images ORDER BY n"))

    def get(self, image: str, default=None) -> list[str] | None:
        """The captions the table gives `image` ([] when it lists it without any), else `default`."""
        rows = self._db.execute("SELECT captions.caption FROM images LEFT JOIN captions ON captions.image = images.n "
                                "WHERE images.image = ? ORDER BY captions.rowid", (str(image),)).fetchall()
        return [caption for caption, in rows if caption is not None] if rows else default

    def get_many(self, images: Sequence[str]) -> dict[str, list[str]]:
        """image -> the captions the table gives it (as `get`), for those of `images` it lists: a statement for
        hundreds of images (a caption sync asks for 10,000 at a time)."""
        found: dict[str, list[str]] = {}
        for start in range(0, len(images), 500):
            chunk = [str(image) for image in images[start:start + 500]]
            rows = self._db.execute("SELECT images.image, captions.caption FROM images LEFT JOIN captions ON "
                                    f"captions.image = images.n WHERE images.image IN ({','.join('?' * len(chunk))})"
                                    " ORDER BY images.n, captions.rowid", chunk)
            for image, caption in rows:
                found.setdefault(image, []).extend([caption] if caption is not None else [])
        return found

    def items(self) -> Iterator[tuple[str, list[str]]]:
        rows = self._db.execute("SELECT images.image, captions.caption FROM images LEFT JOIN captions ON "
                                "captions.image = images.n ORDER BY images.n, captions.rowid")
        for image, group in itertools.groupby(rows, key=lambda row: row[0]):
            yield image, [caption for _, caption in group if caption is not None]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "TableRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_table(path: str | os.PathLike, image_column: str = "image", caption_column: str = "caption",
               root: str | os.PathLike | None = None, captions: bool = True) -> TableRows:
    """The rows of a CSV or TSV (with a header), JSONL or parquet file by image (rows of one image merged),
    streamed into a `TableRows`. Relative image paths are taken relative to `root` (default: the table's
    folder). In JSONL the caption field may be a string or a list of strings. `captions=False`: a list of
    images is read too, a table whose one column is `image_column` or a .txt file of image paths, one a line.
    Without the (default) `image` or `caption` column, others are looked for (`clipkit.data.urls.table_columns`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption table not found: {path}")
    image_column, caption_column = table_columns(path, image_column, caption_column)
    root = os.path.abspath(root if root is not None else path.parent)
    if table_suffix(path) == ".parquet":
        _check_row(path, 1, dict.fromkeys(parquet_file(path).schema_arrow.names), image_column, caption_column,
                   captions)
    try:
        with temp_space(f"the rows of {path}"):
            return TableRows(_image_rows(path, image_column, caption_column, root, captions))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at {exc.start}): "
                         "save it as UTF-8 (Excel: \"CSV UTF-8\")") from None


def _image_rows(path: Path, image_column: str, caption_column: str, root: str,
                captions: bool) -> Iterator[tuple[str, list[str]]]:
    """(absolute image path, its captions in this row) for each row of the table, checked."""
    for number, row in enumerate(table_records(path, [image_column, caption_column], errors="strict"), 1):
        _check_row(path, number, row, image_column, caption_column, captions)
        texts = row.get(caption_column)
        texts = [texts] if isinstance(texts, str) else list(texts or ())
        yield (os.path.abspath(os.path.join(root, file_path(str(row[image_column])))),
               [c.strip() for c in texts if isinstance(c, str) and c.strip()])


def file_path(name: str) -> str:
    """A path as a table lists it: a file: URL (file:///a/b%20c.jpg) is the path it names."""
    if not name.startswith("file:"):
        return name
    parsed = urllib.parse.urlsplit(name)
    return urllib.parse.unquote(parsed.path) if parsed.netloc in ("", "localhost") else name


def _check_row(path: Path, number: int, row: dict, image_column: str, caption_column: str, captions: bool) -> None:
    """A row without the image column, or without the caption column where one is needed, is refused."""
    if image_column in row and (caption_column in row or (not captions and len(row) == 1)):
        return
    separated = len(row) == 1 and ";" in next(iter(row), "")
    raise ValueError(f"{path} row {number} lacks column {image_column!r} or {caption_column!r} "
                     f"(columns: {', '.join(map(str, row))}); "
                     + ("its columns look separated by ';': save it with ',' (or tabs, as .tsv)" if separated
                        else "pass --image-column / --caption-column (image_column= / caption_column=)"))
