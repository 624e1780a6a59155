"""Data: image reading, folder scanning, the synthetic data set, webdataset shards, caption files."""

from clipkit.data.captions import RetrievalSet, read_karpathy, synthetic_set
from clipkit.data.folder import IMAGE_EXTENSIONS, scan_images
from clipkit.data.images import decode_image, read_image
from clipkit.data.loader import make_loader
from clipkit.data.shards import Sample, samples_from_folder, samples_from_table, write_shards
from clipkit.data.synthetic import write_synthetic

__all__ = ["IMAGE_EXTENSIONS", "RetrievalSet", "Sample", "decode_image", "make_loader", "read_image",
           "read_karpathy", "samples_from_folder", "samples_from_table", "scan_images", "synthetic_set",
           "write_shards", "write_synthetic"]
