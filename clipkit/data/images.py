"""One image reader for every path in clipkit (indexing, encode from paths, training, serving)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from clipkit.errors import ImageReadError

HEIF_SUFFIXES = (".heic", ".heif")


def _register_heif() -> bool:
    """Whether Pillow reads HEIC / HEIF (iPhone photos): through pillow-heif (`clipkit[heif]`), when installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


HEIF_READABLE = _register_heif()

# Formats never decoded, whatever a file's name says: Pillow reads EPS by running Ghostscript, a PostScript
# interpreter, on the file's content, which would let anyone who can put a file in an indexed folder (or
# upload one to `clipkit serve`) run a program on this machine.
UNSAFE_FORMATS = frozenset({"EPS"})

JPEG_SCALE = 8  # the most a JPEG's DCT scales its decoding down by


def _open(source, drafted: bool = False) -> Image.Image:
    """`Image.open` over every format Pillow reads except `UNSAFE_FORMATS`. `drafted`: a JPEG will be decoded at
    reduced scale, so Pillow's pixel limit applies to what the draft decodes (`_check_pixels` after it), not to
    the file's full size: a 100-200 MP photo (medium-format cameras, phones' 200 MP mode, panoramas) decoded
    at 1/8 scale holds 1/64 of its pixels."""
    if drafted and _peek(source, 3) == b"\xff\xd8\xff":
        from PIL import JpegImagePlugin

        image = JpegImagePlugin.jpeg_factory(source)  # (Image.open's own pixel check skipped: see above)
        _check_pixels(image.size, JPEG_SCALE ** 2)
        return image
    Image.init()
    return Image.open(source, formats=[name for name in Image.OPEN if name not in UNSAFE_FORMATS])


def _check_pixels(size: tuple[int, int], times: int = 1) -> None:
    """Refuse an image of more than `times` x Pillow's pixel limit (`Image.MAX_IMAGE_PIXELS`; None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size[0] * size[1] > times * limit:
        raise Image.DecompressionBombError(f"Image size ({size[0] * size[1]} pixels) exceeds limit of "
                                           f"{times * limit} pixels, could be decompression bomb DOS attack.")


def _peek(source, count: int) -> bytes:
    position = source.tell()
    head = source.read(count)
    source.seek(position)
    return head


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping to white.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def _decode(source, name: str, min_side: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # A file over PIL's pixel limit is refused rather than allocated.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open(source, drafted=bool(min_side)) as image:
                image.seek(0)
                if min_side and image.format in ("JPEG", "MPO"):
                    # decode at 1/2, 1/4 or 1/8 scale in the DCT, keeping both sides >= min_side
                    image.draft(image.mode, (min_side, min_side))
                    _check_pixels(image.size)  # what is decoded
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        kind, reason = _failure(exc, name)
        raise ImageReadError(f"cannot read image {name}: {reason}", kind) from exc


def _failure(exc: BaseException, name: str = "") -> tuple[str, str]:
    """(kind, reason) of a decoding error (of the image called `name`)."""
    if isinstance(exc, Image.UnidentifiedImageError) and name.lower().endswith(HEIF_SUFFIXES) and not HEIF_READABLE:
        return "HEIC without pillow-heif", "HEIC / HEIF photos need pillow-heif: pip install 'clipkit[heif]'"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image", "not a recognised image format"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too many pixels", (f"refused as a possible decompression bomb ({exc}); if it is a real image, "
                                   "raise the limit: clipkit index --max-pixels MP (PIL.Image.MAX_IMAGE_PIXELS)")
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, (EOFError, SyntaxError)) or "truncated" in reason or "broken data stream" in reason:
        return "truncated or corrupt", reason
    return "corrupt", reason


def failure_kind(exc: BaseException) -> str:
    """A few words for why an image could not be read: for skip summaries."""
    if isinstance(exc, ImageReadError):
        return exc.kind
    if isinstance(exc, FileNotFoundError):
        return "vanished"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a file"
    return "unreadable"


def read_image(path: str | os.PathLike, min_side: int | None = None) -> Image.Image:
    """Decode `path` into an RGB image with EXIF orientation applied (first frame of animations).

    `min_side`: a JPEG much larger than that is decoded at a reduced scale (PIL's draft mode), both
    sides staying >= min_side: several times less work for photos headed to a 224-pixel model.
    Raises `FileNotFoundError` when the file does not exist and `ImageReadError` (a `ValueError`)
    with the reason when it exists but is not a readable image.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    if size == 0:
        raise ImageReadError(f"cannot read image {path}: the file is empty", "empty file")
    try:
        with open(path, "rb") as handle:
            return _decode(handle, str(path), min_side)
    except FileNotFoundError:  # vanished between the stat and the open
        raise FileNotFoundError(f"image file not found: {path}") from None
    except PermissionError as exc:
        raise ImageReadError(f"cannot read image {path}: permission denied", "permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(f"cannot read image {path}: it is a folder", "not a file") from exc


@dataclass(frozen=True)
class TarMember:
    """An image stored in an uncompressed tar file (a webdataset shard): where its bytes lie."""

    tar: str
    name: str  # the member's name in the tar
    offset: int  # of its data in the file
    size: int

    def read_bytes(self) -> bytes:
        try:
            with open(self.tar, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {self.tar}") from None
        if len(data) != self.size:
            raise ImageReadError(f"cannot read {self.name} from {self.tar}: the shard was cut short or rewritten",
                                 "truncated or corrupt")
        return data

    def __str__(self) -> str:
        return f"{self.tar}#{self.name}"


URL_MAX_BYTES = 32 << 20  # an image fetched for indexing: larger bodies are skipped ("too large")
URL_DEADLINE = 20.0  # seconds for one fetch in all (redirects and slow servers included; img2dataset: 10)
URL_CONCURRENCY = 64  # fetches at once in one process
_url_fetcher = None


@dataclass(frozen=True)
class ImageURL:
    """An image at an http(s) URL (a row of a URL table being indexed): fetched when read, within
    URL_DEADLINE seconds and URL_MAX_BYTES; any address the user's table names (not only public ones)."""

    url: str

    def read_bytes(self) -> bytes:
        from clipkit.data.fetch import FetchError, Fetcher

        global _url_fetcher
        if _url_fetcher is None:
            _url_fetcher = Fetcher(URL_MAX_BYTES, URL_DEADLINE, URL_CONCURRENCY, public_only=False, wait=True,
                                   noun="the URL")
        try:
            return _url_fetcher.fetch(self.url)
        except FetchError as exc:
            raise ImageReadError(f"cannot read image {self.url}: {exc}", exc.kind) from None

    def __str__(self) -> str:
        return self.url


def is_url(text) -> bool:
    return isinstance(text, str) and text[:8].lower().startswith(("http://", "https://"))


_MEMBER = "tar-member:"


def item_text(item) -> str:
    """An image file, shard member or URL as text (what goes to another process): `image_item` reads it back."""
    if isinstance(item, TarMember):
        return _MEMBER + json.dumps([item.tar, item.name, item.offset, item.size])
    return str(item) if isinstance(item, ImageURL) else os.fsdecode(item)


def image_item(text: str):
    """What `item_text` wrote: a `TarMember`, an `ImageURL` for http(s), else the path itself."""
    if text.startswith(_MEMBER):
        return TarMember(*json.loads(text[len(_MEMBER):]))
    return ImageURL(text) if is_url(text) else text


def decode_image(data: bytes, name: str = "<bytes>", min_side: int | None = None) -> Image.Image:
    """Like `read_image`, for encoded image bytes (a shard member, an upload)."""
    return _decode(io.BytesIO(data), name, min_side)


def image_media_type(data: bytes, name: str = "<bytes>") -> str:
    """The media type of encoded image bytes, from what they hold (not a file name); ImageReadError when
    they are not an image PIL recognises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # (nothing is decoded here)
            with _open(io.BytesIO(data), drafted=True) as image:  # (a large JPEG is sent as it is)
                kind = image.format
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{name} has too many pixels ({exc})", "too many pixels") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{name} is not an image", "not an image") from exc
    return Image.MIME.get(kind, "application/octet-stream")


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpg":
        image.save(buffer, format="JPEG", quality=92)
    else:
        raise ValueError(f"image format must be png or jpg, got {image_format!r}")
    return buffer.getvalue()
