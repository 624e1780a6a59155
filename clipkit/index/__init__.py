"""The index: `Index` (clipkit/index/core.py), a thin facade over

- `store`: SQLite, the source of truth (items, roots, settings, removal log, format version and migrations,
  generation);
- `segments`: the vectors, in memory-mapped append-only segment files (precision, compaction);
- `ann`: the FAISS structures (choice, training, search parameters, exact re-rank, exact search over the
  stored vectors, GPU copies, the delta and removal filter beside saved lists), a cache of the store;
- `ondisk`: IVF inverted lists on disk, memory-mapped (writing, opening, merging them);
- `tune`: building and tuning them on the collection's own data, in RAM or streamed under a memory budget;
- `live`: the structure kept in step with the store (catch-up, rebuild, build, trusting saved files);
- `persist`: saving to a folder and opening it again;
- `merge`: several indexes into one, resumable;
- `sync`, `shards`, `ingest`: folders of images, webdataset shards, precomputed embedding folders;
- `lock`: one writer at a time (an OS file lock held for a whole run);
- `vectors`: what goes in (unit vectors, ids);
- `captions`: the caption collection (NAME.txt files or a caption table), for image -> text search.
"""

from clipkit.index.ann import FLAT_LIMIT, apply_search_params, candidates, choose_structure
from clipkit.index.captions import CaptionTable
from clipkit.index.core import Index
from clipkit.index.persist import CONFIG_FILE, FAISS_FILE
from clipkit.index.store import DB_FILE, FORMAT_VERSION, is_index
from clipkit.index.sync import SyncPlan, SyncReport, file_hash, shard_of
from clipkit.index.tune import Tuning, tune_structure
from clipkit.index.vectors import prepare_vectors

__all__ = ["CaptionTable", "CONFIG_FILE", "DB_FILE", "FAISS_FILE", "FLAT_LIMIT", "FORMAT_VERSION", "Index", "SyncPlan",
           "SyncReport", "Tuning", "apply_search_params", "candidates", "choose_structure", "file_hash", "is_index",
           "prepare_vectors", "shard_of", "tune_structure"]
