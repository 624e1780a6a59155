"""Tables of image URLs, as img2dataset takes them: parquet, CSV or TSV (with a header) or JSONL with a `url` column
and optionally a `caption` column, or a .txt file of one URL a line. Read in chunks: a table of a billion
rows never sits in memory.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clipkit._io import batches, file_encoding
from clipkit.data.images import is_url

URL_TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".ndjson", ".txt")


def table_suffix(path: str | os.PathLike) -> str:
    """A table's kind by its name, lower case, `.gz` looked through: `.csv` for `urls.csv.gz` (img2dataset
    takes gzipped CSV, TSV, JSONL and text tables; they are read as streams, never unpacked on disk)."""
    name = Path(path).name.lower()
    return Path(name[:-3] if name.endswith(".gz") else name).suffix


@dataclass(frozen=True)
class UrlTable:
    """A table of image URLs (`url_column`), with captions where it has `caption_column`."""

    path: str
    url_column: str = "url"
    caption_column: str = "caption"

    @classmethod
    def of(cls, path: str | os.PathLike, url_column: str = "url", caption_column: str = "caption") -> "UrlTable":
        if not Path(path).is_file():
            raise FileNotFoundError(f"URL table not found: {path}")
        if table_suffix(path) not in URL_TABLE_SUFFIXES:
            raise ValueError(f"{path}: a URL table is a .parquet, .csv, .tsv, .jsonl or .txt file (or .gz of one)")
        table = cls(os.path.abspath(path), url_column, caption_column)
        if table.kind == "txt":
            return table
        columns = table.columns()
        if url_column == "url":  # (LAION's parquet: URL and TEXT)
            url_column = named(columns, "url") or url_column
        caption_column = _caption_column(columns, caption_column)
        if url_column not in columns:
            raise ValueError(f"{path} has no column {url_column!r} (columns: {', '.join(columns)}); pass "
                             "--url-column")
        return cls(os.path.abspath(path), url_column, caption_column)

    @property
    def kind(self) -> str:
        suffix = table_suffix(self.path)
        return "jsonl" if suffix == ".ndjson" else suffix[1:]

    def columns(self) -> list[str]:
        """The table's column names (of its first row, for JSONL)."""
        if self.kind == "parquet":
            return parquet_file(self.path).schema_arrow.names
        if self.kind in ("csv", "tsv"):
            with _open_text(self.path, errors="replace", newline="") as handle:
                return next(csv.reader(handle, delimiter=_DELIMITERS[self.kind]), [])
        if self.kind == "jsonl":
            return list(next(table_records(self.path, []), {}))
        return [self.url_column]

    def count(self) -> int | None:
        """Rows, where the table says so without being read (parquet); else None."""
        return parquet_file(self.path).metadata.num_rows if self.kind == "parquet" else None

    def chunks(self, size: int = 50_000) -> Iterator[list[tuple[str, str | None]]]:
        """(url, caption or None) rows, `size` at a time, in the table's order."""
        return batches(self._rows(), size)

    def _rows(self) -> Iterator[tuple[str, str | None]]:
        for record in table_records(self.path, [self.url_column, self.caption_column]):
            url, caption = record.get(self.url_column), record.get(self.caption_column)
            caption = caption.strip() if isinstance(caption, str) else None
            yield (url.strip() if isinstance(url, str) else url), caption or None


PATH_COLUMNS = ("image_path", "path", "filepath", "file")  # a listing of files (clip-retrieval's metadata)


def is_url_table(path: str | os.PathLike, url_column: str | None = None, image_column: str = "image") -> bool:
    """Whether a table given as `clipkit index SOURCE` lists URLs rather than image files: a .txt file of
    URLs; a table with the URL column named (`url_column`); or one with a `url` column of URLs to fetch (not
    file paths) and no column of file paths (`image_column`, `image_path`, ...: a table with both is a
    caption table of the files, `table_columns`). The URL column may be spelled in any case (LAION's URL)."""
    suffix = table_suffix(path)
    if suffix not in URL_TABLE_SUFFIXES or not Path(path).is_file():
        return False
    if suffix == ".txt":
        return is_url(first_line(path))
    try:
        columns = UrlTable(os.path.abspath(path), url_column or "url").columns()
    except (OSError, ValueError):
        return False  # unreadable: the caption table's reader says why
    if url_column is not None:
        return url_column in columns
    url = named(columns, "url")
    return url is not None and not any(c in columns for c in (image_column, *PATH_COLUMNS)) and \
        not _lists_files(path, url)


def table_columns(path: str | os.PathLike, image_column: str = "image",
                  caption_column: str = "caption") -> tuple[str, str]:
    """(image column, caption column) of a caption table. Named ones (not the defaults) are taken as they
    are. Else the image column is `image`, else the first of PATH_COLUMNS the table has, else its `url` column
    where that holds file paths or file: URLs (img2dataset's input, made of local files) rather than http(s)
    URLs; the caption column is `caption`, else `text` (LAION's TEXT), in any case."""
    try:
        columns = UrlTable(os.path.abspath(path), image_column).columns()
    except (OSError, ValueError):
        return image_column, caption_column  # unreadable: the caption table's reader says why
    caption_column = _caption_column(columns, caption_column)
    if image_column != "image":
        return image_column, caption_column
    found = next((c for c in (image_column, *PATH_COLUMNS) if c in columns), None)
    url = named(columns, "url")
    return found or (url if url and _lists_files(path, url) else image_column), caption_column


def _caption_column(columns: list[str], caption_column: str) -> str:
    """`caption_column`; the default `caption` is else a `text` column (LAION's TEXT), in any case."""
    return (named(columns, "caption", "text") or caption_column) if caption_column == "caption" else caption_column


def named(columns: list[str], name: str, *others: str) -> str | None:
    """The column called `name` (else one of `others`): as it is spelled, else in any case (LAION's URL)."""
    by_lower = {}
    for column in columns:
        by_lower.setdefault(str(column).lower(), column)
    for wanted in (name, *others):
        if wanted in columns:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
    return None


def _lists_files(path, column: str) -> bool:
    """Whether the first value in `column` of the table is a file: a file: URL, an absolute path, or a relative
    one that exists beside the table (`www.site.com/a.jpg`, a URL without its scheme, is not)."""
    try:
        value = next((row.get(column) for row in table_records(path, [column])
                      if isinstance(row.get(column), str) and row.get(column).strip()), "").strip()
    except (OSError, ValueError):
        return False
    if value.startswith("file:") or os.path.isabs(value):
        return True
    return bool(value) and "://" not in value and os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                             value))


def parquet_file(path):
    """A parquet table opened for reading (its schema and row groups, nothing else read yet)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow: pip install 'clipkit[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path} is not a readable parquet file ({exc})") from None


def json_record(line: str, path, number: int) -> dict:
    """One line of a JSONL file, or a ValueError that says where."""
    try:
        return json.loads(line)
    except ValueError as exc:
        raise ValueError(f"{path} line {number} is not JSON: {exc}") from None


_DELIMITERS = {"csv": ",", "tsv": "\t"}


def table_records(path: str | os.PathLike, columns: list[str], errors: str = "replace") -> Iterator[dict]:
    """The rows of a table file as dicts, streamed (a table of any size is never read whole): parquet (only
    those of `columns` it has), CSV / TSV with a header, JSONL, or a .txt file of one value a line (as
    `columns[0]`); any but parquet may be gzipped (.gz). `errors`: how text that is not UTF-8 is decoded
    ("strict": a UnicodeDecodeError)."""
    suffix = table_suffix(path)
    if suffix == ".parquet":
        source = parquet_file(path)
        wanted = [c for c in columns if c in source.schema_arrow.names]
        for batch in source.iter_batches(batch_size=8192, columns=wanted):
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        with _open_text(path, errors=errors, newline="") as handle:
            yield from csv.DictReader(handle, delimiter=_DELIMITERS[suffix[1:]])
    elif suffix in (".jsonl", ".ndjson"):
        yield from (json_record(line, path, n) for n, line in enumerate(_lines(path, errors), 1) if line.strip())
    else:
        yield from ({columns[0]: line.strip()} for line in _lines(path, errors) if line.strip())


def first_line(path) -> str:
    """The first non-empty line of a text file, stripped ("" when it has none)."""
    return next((line.strip() for line in _lines(path) if line.strip()), "")


def _lines(path, errors: str = "replace") -> Iterator[str]:
    with _open_text(path, errors=errors) as handle:
        yield from handle


def _open_text(path, errors: str = "replace", newline: str | None = None):
    """A text table opened for reading (`clipkit._io.file_encoding`: UTF-8, its byte order mark skipped, or the
    UTF-16 or UTF-32 its mark names), through gzip for a .gz name."""
    if str(path).lower().endswith(".gz"):
        with open(path, "rb") as raw:
            if raw.read(2) != b"\x1f\x8b":
                raise ValueError(f"{path} is not gzip-compressed: name it without .gz, or compress it")
        return gzip.open(path, "rt", encoding=file_encoding(path, gzip.open), errors=errors, newline=newline)
    return open(path, encoding=file_encoding(path), errors=errors, newline=newline)
