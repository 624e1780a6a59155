"""Data: image reading, folder scanning (and, later, shards and caption files)."""

from clipkit.data.folder import IMAGE_EXTENSIONS, scan_images
from clipkit.data.images import read_image

__all__ = ["IMAGE_EXTENSIONS", "read_image", "scan_images"]
