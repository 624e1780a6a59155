"""Exception types.

`ValueError` / `FileNotFoundError` are used for bad arguments and missing files, as users expect.
`ClipkitError` marks broken artefacts (indexes, checkpoints, unreadable images); subclasses that are
also argument errors inherit from `ValueError` too, so `except ValueError` keeps working.
"""


class ClipkitError(Exception):
    """A clipkit artefact (index, checkpoint, image) is broken, or an operation cannot proceed."""


class CheckpointError(ClipkitError):
    """A weights file cannot be read, is unsafe, or does not fit the model."""


class BrokenIndexError(ClipkitError):
    """An index directory is missing parts, truncated or from an incompatible version."""


class ModelMismatchError(ClipkitError, ValueError):
    """A query was embedded by a different model than the one that built the index."""


class ImageReadError(ClipkitError, ValueError):
    """A file could not be decoded as an image; `kind` says why in a few words, for summaries."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


class OfflineError(ClipkitError, RuntimeError):
    """Pretrained weights are not cached and the hub cannot be reached."""


class IndexBusyError(ClipkitError):
    """Another process is writing the index and this one was asked not to wait."""


class ReadOnlyIndexError(ClipkitError):
    """The index lives on read-only storage (or its files are read-only): it can be searched, not changed."""


class IndexFullError(ClipkitError):
    """The disk holding the index filled up; what was committed before is kept."""


class TempFullError(ClipkitError):
    """The temporary folder (where a run lists a folder's plan or a table's rows) filled up; nothing committed
    is lost."""


class EngineError(ClipkitError):
    """The engine embedding the images (a Ray cluster) failed; the batches committed before are kept."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for one-line
    errors built on top of a library's multi-line ones."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
