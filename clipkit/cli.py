"""The `clipkit` command: argument parsing and printing only; the work is done by the library."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shlex
import sqlite3
import sys
from pathlib import Path

from clipkit._io import decode_text, file_encoding, printable
from clipkit.data.folder import is_image_name

DEFAULT_INDEX = os.environ.get("CLIPKIT_INDEX", "index.clipkit")
MODEL_HELP = ("a clipkit or open_clip architecture name (ViT-B-32 with --pretrained TAG_OR_FILE), a transformers "
              "checkpoint folder or hf:ORG/REPO (CLIP, SigLIP, SigLIP 2), an open_clip hub model hf-hub:ORG/REPO, or "
              "a weights file (or run folder: its latest) of `clipkit train` / `train-rerank` (the model it names)")
DEVICE_HELP = "cpu, cuda or cuda:N (default: CUDA when present, else the CPU)"
PRETRAINED_HELP = ("open_clip pretrained tag, a local weights file, or a `clipkit train` run folder (its latest "
                   "checkpoint)")
RERANKER_HELP = ("another model: a BLIP / BLIP-2 ITM checkpoint (directory or hf:ORG/REPO), a clipkit model with an "
                 "ITM head, or a weights file of `clipkit train` or `clipkit train-rerank`")


class UsageError(Exception):
    """Bad command-line usage: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        extra = message.split(": ", 1)[1].split() if message.startswith("unrecognized arguments: ") else []
        if len(extra) > 4:  # (as a shell pattern such as photos/*.jpg gives: one argument a file)
            message = (f"unrecognized arguments ({' '.join(extra[:3])} ...): an unquoted pattern such "
                       "as photos/*.jpg gives one argument a file; give their folder instead")
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _CommandParser(_Parser):
    """A command's parser: its options may come between its positional arguments, as users write them
    (`clipkit search INDEX -k 5 "a dog"`, `clipkit index photos -q photos.clipkit`)."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:  # (argparse's intermixed parse calls this twice: options, then positionals)
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def build_parser(command: str | None = "*") -> argparse.ArgumentParser:
    """The CLI's parser. `command`: the one command that will be parsed (None: none, only the global flags);
    the options of eval, train and train-rerank come from modules that import torch, so they are added only
    when that command, or every command ("*"), is parsed: `clipkit info` starts in a fraction of the time."""
    from clipkit import DEFAULT_MODEL, __version__

    parser = _Parser(prog="clipkit", description="Contrastive image-text embeddings and cross-modal retrieval.")
    parser.add_argument("--version", action="version", version=f"clipkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries; warnings still show")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    _add_index_command(commands, DEFAULT_MODEL)
    _add_search_command(commands)
    _add_data_commands(commands)
    heavy = {"eval": ("Recall@1/5/10 both ways, ITC and ITM re-ranked (same as benchmarks/retrieval.py)",
                      _add_eval_arguments),
             "train": ("train a dual encoder (+ ITM head) on shards or synthetic data", _add_train_arguments),
             "train-rerank": ("fit a re-ranking head (late-interaction, or the model's fusion ITM head) on a trained "
                              "model's frozen towers", _add_rerank_arguments)}
    for name, (help_text, add_arguments) in heavy.items():
        sub = commands.add_parser(name, help=help_text)
        if command in ("*", name):
            add_arguments(sub)
    _add_serve_command(commands)
    for sub in commands.choices.values():  # `clipkit index -q ...` works as `clipkit -q index ...` does
        _add_global_flags(sub)
    return parser


def _command_in(words: list[str]) -> str | None:
    """The command `words` (the CLI's arguments) name: the first that is not an option."""
    return next((word for word in words if not word.startswith("-")), None)


def _add_global_flags(command) -> None:
    command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log more detail (the same as clipkit -v)")
    command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                         help="no progress bars or summaries; warnings still show (the same as clipkit -q)")


def _add_index_command(commands, default_model: str) -> None:
    index = commands.add_parser("index", help="index (or update the index of) a folder of images")
    index.add_argument("folder", metavar="SOURCE",
                       help="folder of images, searched recursively (captions: NAME.txt beside NAME.jpg); a caption "
                            "table (.csv / .tsv / .jsonl / .parquet) listing images and their captions; a table of image "
                            "URLs as img2dataset takes it (a 'url' column, optionally 'caption'; or .txt, one URL a "
                            "line: each image fetched, its URL the id); or webdataset shards "
                            "('shards/{000000..000009}.tar', or a folder of .tar files and no images: indexed in place, "
                            "captions from their txt members; shards deleted from such a folder leave the index)")
    index.add_argument("--captions", default=None, metavar="TABLE",
                       help="captions of the folder's images from a .csv / .tsv / .jsonl / .parquet table (remembered for "
                            "later runs)")
    index.add_argument("--image-column", default="image", help="caption table: the image path column (default: image)")
    index.add_argument("--caption-column", default="caption",
                       help="caption table: the caption column (default: caption)")
    index.add_argument("--url-column", default=None,
                       help="URL table: the URL column (default: url; naming it makes SOURCE a URL table)")
    index.add_argument("--root", default=None,
                       help="caption table: the folder its relative image paths start from (default: the table's)")
    index.add_argument("index_at", nargs="?", default=None, metavar="INDEX",
                       help="the index to write, as --index (a name ending in .clipkit, or an index)")
    index.add_argument("--index", default=None, help=f"index folder to write (default: {DEFAULT_INDEX})")
    index.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: the index's model, else {default_model})")
    index.add_argument("--pretrained", default=None, help=PRETRAINED_HELP)
    index.add_argument("--batch-size", type=_positive_int, default=64, help="images per encoder call (default: 64)")
    index.add_argument("--workers", type=_positive_int, default=None, help="image decoding threads")
    index.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: this process's GPU if there is one: "
                       "cuda:$LOCAL_RANK under torchrun, else the CPU)")
    index.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                       help="skip files and folders whose name or relative path matches (repeatable); remembered "
                            "for the folder, so later runs leave out the same")
    index.add_argument("--no-exclude", action="store_true",
                       help="forget the folder's remembered --exclude globs: index everything in it again")
    index.add_argument("--skipped-log", default=None, metavar="FILE",
                       help="write the files that could not be read, with why, as JSON lines")
    index.add_argument("--max-pixels", type=float, default=None, metavar="MP",
                       help="read images of up to MP megapixels (default: Pillow's 89; larger ones are skipped as "
                            "possible decompression bombs). A PNG or TIFF is decoded in full: 3 bytes a pixel")
    _add_index_scale_options(index)
    index.add_argument("--check", action="store_true",
                       help="report what an update would do (add, re-embed, move, remove) and change nothing (a folder "
                            "of images, or shards: which shards would be read, moved or removed)")
    index.add_argument("--no-wait", action="store_true",
                       help="if another process is writing the index, exit (code 2) instead of waiting for it")
    _add_maintenance_commands(commands)
    merge = commands.add_parser("merge", help="merge indexes (e.g. the shards of `clipkit index --shard`) into one")
    merge.add_argument("out", help="the merged index folder to write (a new one; run again after an interruption, "
                       "it goes on where it stopped)")
    merge.add_argument("parts", nargs="+", help="index folders to merge")
    merge.add_argument("--index-type", default="flat", metavar="TYPE", help="flat, auto or a FAISS factory string")


def _add_index_scale_options(index) -> None:
    """`clipkit index`'s options for large collections: the ANN structure, storage, sharding and Ray."""
    index.add_argument("--index-type", default=None, metavar="TYPE",
                       help="flat (exact, the default), auto (exact while small, then the fastest ANN structure tuned "
                            "to recall@10 >= 0.95 on held-out items), or a FAISS factory string such as IVF4096,Flat, "
                            "HNSW32 or IVF1024,PQ128x4fs,RFlat")
    index.add_argument("--precision", default=None, choices=("auto", "float16", "float32"),
                       help="how a new index stores its vectors: auto (float32 while search is exact, float16 once "
                            "an ANN structure is built; the default for images), float16 (half the disk; the default "
                            "for an embedding folder, which holds float16) or float32")
    index.add_argument("--tune-queries", default=None, metavar="FILE",
                       help="queries like the ones this index will get, to tune the ANN structure on: a .npy of "
                            "vectors, or a text file of query texts (one a line); remembered for later builds "
                            "(default: the index's caption embeddings, else held-out items)")
    index.add_argument("--shard", default=None, metavar="I/N",
                       help="index only part I of N of SOURCE (a folder's files or a URL table's URLs by a hash, or a "
                            "webdataset's shard files: every N-th from the I-th) into its own index; 'auto' takes "
                            "I and N from torchrun's RANK and WORLD_SIZE. {rank} in --index is replaced by I. "
                            "Merge the parts with `clipkit merge`")
    index.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="where images are embedded: this process (default), or Ray Data actors (a local Ray "
                            "started for the run, or the cluster of --ray-address); batches are committed as they "
                            "arrive, and a run stopped midway goes on where it stopped. Needs clipkit[ray]")
    index.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="--engine ray: join this Ray cluster ('auto', or ray://HOST:10001) instead of starting one")
    index.add_argument("--ray-actors", type=_positive_int, default=None, metavar="N",
                       help="--engine ray: model actors (default: one per GPU of the cluster, else one per CPU)")
    index.add_argument("--ray-items-per-call", type=_positive_int, default=None, metavar="N",
                       help="--engine ray: images handed to Ray at a time (default 500000). Each hand-off starts "
                            "the actor pool (every actor loads the model) and the driver holds ~360 bytes an image "
                            "meanwhile: raise it where a large cluster embeds a call in less than a minute")


def _add_search_command(commands) -> None:
    search = commands.add_parser("search", help="search an index with a text query or an image file")
    search.add_argument("query", nargs="*", help="text, or an image to search by: a file's path, an http(s) URL "
                        "(fetched), or an indexed item's id as search prints it (SHARD.tar#KEY); several queries "
                        "are searched in one run, each under a '# QUERY' line (--json: a JSON line each); a first "
                        "one that is an index (or ends in .clipkit) is the index to search, as --index")
    search.add_argument("--queries", metavar="FILE", help="search each line of FILE as a QUERY (- reads them from "
                        "stdin, answering each line as it comes: one model load for a session of queries)")
    search.add_argument("--text", action="store_true", help="treat QUERY as text even if it looks like a file name")
    search.add_argument("--index", default=None, help=f"index folder (default: {DEFAULT_INDEX}); with --server, "
                        "the name of one of the indexes it serves (default: its first)")
    search.add_argument("--server", metavar="URL", help="ask a running `clipkit serve` at URL (its token from "
                        "$CLIPKIT_SERVE_TOKEN): its index and model, no model loaded here, an answer in a fraction "
                        "of a second")
    search.add_argument("-k", type=_positive_int, default=10, help="number of results (default: 10)")
    output = search.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the hits as a JSON list (several queries: a JSON "
                        "object a line, {\"query\": ..., \"hits\": [...]} or {\"query\": ..., \"error\": ...})")
    output.add_argument("--paths", action="store_true", help="print only the file paths, one per line (several "
                        "queries: an empty line after each query's)")
    search.add_argument("--rerank", action="store_true", help="re-rank the top candidates with the model's ITM head")
    search.add_argument("--rerank-k", type=_positive_int, default=None, help="candidates to re-rank (default: max(k, 32))")
    search.add_argument("--reranker", default=None, metavar="MODEL",
                        help=f"re-rank with {RERANKER_HELP} (implies --rerank)")
    search.add_argument("--device", default=None, help=DEVICE_HELP)
    search.add_argument("--captions", action="store_true",
                        help="search the captions indexed beside the images (image -> text, text -> text)")
    search.add_argument("--under", metavar="FOLDER", help="only the items whose file (or shard) lies in FOLDER (or "
                        "below it): one trip's photos in an index of all of them (exact up to 200,000 items there)")


def _add_data_commands(commands) -> None:
    synth = commands.add_parser("synth", help="write the synthetic compositional image-caption data set")
    synth.add_argument("out_dir", help="output folder")
    synth.add_argument("--n", type=_positive_int, default=20_000, help="number of images (default: 20000)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the scenes (default: 0)")
    synth.add_argument("--split", choices=["train", "val", "test"], default="train",
                       help="which split's scenes (each split draws from its own random stream; default: train)")
    synth.add_argument("--size", type=_positive_int, default=64, help="image side in pixels (default: 64)")
    synth.add_argument("--format", choices=["shards", "folder"], default="shards",
                       help="webdataset .tar shards, or a folder of images with NAME.txt captions (default: shards)")
    synth.add_argument("--image-format", choices=["jpg", "png"], default="jpg", help="image encoding (default: jpg)")
    synth.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard")
    synth.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")

    demo = commands.add_parser("demo", help="offline demo: make images, index them, search, draw a results grid")
    demo.add_argument("--out", default=None, help="output folder (default: a new clipkit-demo-TIME folder here)")
    demo.add_argument("--n", type=_positive_int, default=300, help="number of sample images (default: 300)")
    demo.add_argument("--model", default="clipkit-demo", help=f"{MODEL_HELP} (default: clipkit-demo, bundled)")
    demo.add_argument("-k", type=_positive_int, default=5, help="hits shown per query (default: 5)")
    models = commands.add_parser("models", help="the models clipkit can load here: its own (bundled), open_clip's "
                                                "pretrained tags (cached, or downloaded at first use), and the "
                                                "checkpoints in the Hugging Face cache")
    models.add_argument("name", nargs="?", default=None, help="only the models whose name contains NAME")
    models.add_argument("--offline", action="store_true", help="only those that load without a network (bundled, "
                                                               "cached)")
    models.add_argument("--json", action="store_true", help="a JSON object a line")
    shards = commands.add_parser("shards", help="write webdataset shards from a captioned folder or a CSV/JSONL file")
    shards.add_argument("source", help="folder of images with same-name .txt captions, or a .csv/.jsonl table")
    shards.add_argument("out_dir", help="folder to write the .tar shards into")
    shards.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default: shard)")
    shards.add_argument("--shard-size", type=_positive_int, default=1000, help="samples per shard (default: 1000)")
    shards.add_argument("--image-column", default="image", help="table source: the image path column (default: image)")
    shards.add_argument("--caption-column", default="caption",
                        help="table source: the caption column (default: caption)")
    shards.add_argument("--skipped-log", default=None, metavar="FILE",
                        help="write the files that could not be read, with why, as JSON lines")


def _add_serve_command(commands) -> None:
    from clipkit.client import TOKEN_VARIABLE  # (the server's token is the one its clients read)

    serve = commands.add_parser("serve", help="HTTP search API (clip-retrieval compatible) and web page")
    serve.add_argument("indexes", nargs="*", metavar="[NAME=]PATH",
                       help=f"index folders to serve (default: {DEFAULT_INDEX}); NAME is what requests ask for "
                            "(default: the folder's name)")
    serve.add_argument("--index", action="append", default=[], metavar="[NAME=]PATH",
                       help="the same, repeatable, as the other commands take it")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000; 0: any free one)")
    serve.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                       help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    serve.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE), metavar="TOKEN|auto",
                       help="a secret every request must show (a Bearer header, ?token=, or the cookie a link "
                            "with it sets); 'auto' makes one and prints the link. Default: $CLIPKIT_SERVE_TOKEN "
                            "(which, unlike an argument, other users of this machine cannot see)")
    serve.add_argument("--tls-cert", default=None, metavar="FILE",
                       help="serve https with this certificate (PEM; its chain too), so that the token and the "
                            "images do not cross the network in clear")
    serve.add_argument("--tls-key", default=None, metavar="FILE",
                       help="the certificate's private key (PEM; default: in the --tls-cert file)")
    serve.add_argument("--allow-image-urls", action="store_true",
                       help="fetch image_url queries (public http(s) hosts only; default: refused)")
    serve.add_argument("--max-k", type=_positive_int, default=1000, help="most results per query (default: 1000)")
    serve.add_argument("--max-body-mb", type=_positive_int, default=20, help="request size limit (default: 20 MB)")
    serve.add_argument("--max-image-mb", type=_positive_int, default=128,
                       help="largest indexed image file /image and /thumbnail read (default: 128 MB)")
    serve.add_argument("--max-result-ids", type=_positive_int, default=10_000,
                       help="clip-retrieval: most num_result_ids per query (default: 10000)")
    serve.add_argument("--front", default=None, metavar="DIR",
                       help="serve clip-retrieval's front end build (its front/build folder) at /front/, "
                            "pointed at this server")
    serve.add_argument("--inline-images", type=int, default=0, metavar="PIXELS",
                       help="clip-retrieval replies carry each image as base64 JPEG of this size, as its own back "
                            "end does (default: 0, off: results carry the image's URL)")
    serve.add_argument("--reranker", default=None, metavar="MODEL",
                       help=f"re-rank (rerank=true queries) with {RERANKER_HELP}")
    serve.add_argument("--device", default=None, help="where the query encoders run: " + DEVICE_HELP)


def _add_eval_arguments(parser) -> None:
    from clipkit.evaluate import DATASETS

    parser.add_argument("--dataset", default="synthetic", metavar="NAME",
                        help=f"{', '.join(DATASETS[:-1])}, or your own data by its path: a folder of images with "
                        "NAME.txt captions, webdataset shards (a .tar, a pattern or a folder of them), a caption "
                        "table (.csv, .tsv, .jsonl, .parquet), or a clipkit index holding captions (its stored "
                        "embeddings, by its own model: nothing is embedded again)")
    parser.add_argument("--root", default=None, help="flickr30k/coco: image folder; wds: shard URLs")
    parser.add_argument("--captions", default=None,
                        help="flickr30k/coco: Karpathy split JSON (default: ROOT/dataset_<name>.json)")
    parser.add_argument("--split", default="test", help="the data set's split (default: test)")
    parser.add_argument("--n-images", type=_positive_int, default=None,
                        help="synthetic: gallery size (default 1000); an index: a random sample of its images")
    parser.add_argument("--seed", type=int, default=0,
                        help="synthetic: seed of the test split; an index: of the sample")
    parser.add_argument("--model", default=None, help=f"{MODEL_HELP} (default: clipkit-demo; an index: its own)")
    parser.add_argument("--pretrained", default=None, help=PRETRAINED_HELP)
    parser.add_argument("--rerank", action="store_true", help="also report ITM re-ranked recall")
    parser.add_argument("--rerank-k", type=_positive_int, default=16, help="ITC candidates re-ranked per query")
    parser.add_argument("--reranker", default=None, metavar="MODEL",
                        help=f"re-rank with {RERANKER_HELP} (implies --rerank)")
    parser.add_argument("--binding", type=int, default=0, metavar="PAIRS",
                        help="also report Winoground-style binding (text / image / group scores) on this many "
                             "synthetic (scene, swapped twin) pairs of --split drawn with --seed (ITC, and the "
                             "re-ranking score with --rerank)")
    parser.add_argument("--weight", type=float, default=None,
                        help="re-ranked score = ITM log-odds + weight x cosine (default: the weight the ITM head "
                             "was fitted with, 0 for a head fitted with none)")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="images or texts per encoder call")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)
    parser.add_argument("--json", default=None, help="write the results as JSON to this file")


def _add_train_arguments(parser) -> None:
    """One option per TrainConfig field (--batch-size for batch_size, --no-itm for itm)."""
    import dataclasses

    from clipkit.train import TrainConfig

    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        help_text = spec.metadata.get("help")
        if spec.type in ("bool", bool, "bool | None"):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=spec.default,
                                help=help_text)
            continue
        kind = {"int": int, "float": float}.get(str(spec.type).split(" ")[0], str)
        required = spec.default is dataclasses.MISSING
        parser.add_argument(flag, dest=spec.name, type=kind, required=required, help=help_text,
                            default=None if required else spec.default)


def _add_rerank_arguments(parser) -> None:
    from clipkit.rerank_train import KINDS, RerankConfig

    parser.add_argument("--model", required=True, help="the model whose towers stay frozen: " + MODEL_HELP)
    parser.add_argument("--pretrained", default=None, help="its weights (open_clip tag, local file, clipkit checkpoint)")
    parser.add_argument("--data", required=True, help="training galleries: webdataset shard URLs, a folder of images "
                        "with NAME.txt captions, a caption table, or synthetic:N")
    parser.add_argument("--gallery-size", type=int, default=1000, help="images per gallery ITC mines candidates in")
    parser.add_argument("--out", required=True, help="the checkpoint to write: the towers plus the new head")
    defaults = RerankConfig()
    helps = {"steps": "optimizer steps (0 with --kind fusion: no training, the model's own head with its "
             "cosine weights fitted to --data)", "captions": "captions per step", "k": "ITC candidates per caption, as "
             "re-ranking will see them", "random": "random gallery images added per step (late head)",
             "width": "the late head's width", "seed": "random seed"}
    for name, text in helps.items():
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"{text} (default: {getattr(defaults, name)})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"learning rate (default: {defaults.lr})")
    parser.add_argument("--i2t-weight", type=float, default=defaults.i2t_weight,
                        help="weight of the image -> text loss (each image's top k captions) beside the text -> "
                             f"image one (0: text -> image only; default: {defaults.i2t_weight})")
    parser.add_argument("--kind", choices=KINDS, default=defaults.kind,
                        help="late: a new late-interaction head; fusion: fine-tune the model's own fusion ITM head "
                             "(default: %(default)s)")
    parser.add_argument("--device", default=None, help=DEVICE_HELP)


def _add_maintenance_commands(commands) -> None:
    remove = commands.add_parser("remove", help="drop items from an index: the files under PATHs (which may no "
                                                "longer exist), or with --missing every indexed folder that is gone")
    remove.add_argument("paths", nargs="*", metavar="PATH", help="files or folders whose items to drop")
    remove.add_argument("--missing", action="store_true", help="drop the items of indexed folders that no longer exist")
    remove.add_argument("--index", default=DEFAULT_INDEX, help=f"index folder (default: {DEFAULT_INDEX})")
    remove.add_argument("--no-wait", action="store_true", help="exit instead of waiting for another writer")
    remove.add_argument("-y", "--yes", action="store_true",
                        help="do not ask (at a terminal) before PATHs at or above every indexed folder drop them all")
    export = commands.add_parser("export", help="write an index's embeddings and metadata in clip-retrieval's "
                                                "layout (img_emb/, text_emb/, metadata/*.parquet)")
    export.add_argument("paths", nargs="+", metavar="[INDEX] OUT",
                        help="the index (else --index) and the folder to write (autofaiss, clip-retrieval and "
                             "`clipkit index OUT` read it)")
    export.add_argument("--index", help=f"index folder (default: {DEFAULT_INDEX})")
    export.add_argument("--part-size", type=_positive_int, default=100_000, help="rows per part (default: 100000)")
    roots = commands.add_parser("roots", help="list the folders an index covers, with item counts")
    _add_index_argument(roots)
    info = commands.add_parser("info", help="what an index is: items, captions, model, structure and its tuned "
                                            "recall, folders, size on disk")
    _add_index_argument(info)
    info.add_argument("--json", action="store_true", help="print it as one JSON object")


def _add_index_argument(parser) -> None:
    """INDEX, or --index INDEX as the other commands take it (read back by `_one_index`)."""
    parser.add_argument("index", nargs="?", default=None, metavar="INDEX",
                        help=f"index folder (default: {DEFAULT_INDEX})")
    parser.add_argument("--index", dest="index_option", metavar="INDEX",
                        help="the same, as the other commands take it")


def _one_index(args) -> str:
    if args.index and args.index_option and args.index != args.index_option:
        raise UsageError("give the index once: INDEX or --index INDEX")
    return args.index or args.index_option or DEFAULT_INDEX


def _index_written(args) -> str:
    """`clipkit index SOURCE [INDEX]`: INDEX or --index (once); a second positional that is neither an index nor a
    name ending in .clipkit is refused (one SOURCE a run: it is most likely a second folder, not a new index)."""
    given = args.index_at
    if given is not None and not given.strip():
        raise UsageError("the INDEX given is empty: give the index folder's path (or leave it out)")
    if given is not None and not _names_index(given):
        raise UsageError(f"clipkit index takes one SOURCE, not also {given}: index each folder in its own run (one "
                         f"index holds them all); to write the index to {given}, give --index {given}")
    if given and args.index and given != args.index:
        raise UsageError("give the index once: INDEX or --index INDEX")
    return given or args.index or DEFAULT_INDEX


def _index_read_first(args) -> None:
    """`clipkit search INDEX QUERY...` as `clipkit search QUERY... --index INDEX`: a first QUERY that is an index, or
    names one (ends in .clipkit), when there is no --index and something else to search for."""
    first = args.query[0] if args.query and args.index is None else None
    several = len(args.query) > 1 or args.queries is not None
    names_index = bool(first) and _names_index(first)
    if first and several and not args.server and not names_index and not Path(DEFAULT_INDEX).exists() \
            and not Path(first).exists():
        raise FileNotFoundError(f"no index at {DEFAULT_INDEX} (the default), and the first QUERY {first!r} is not "
                                f"one either: give the index first or as --index INDEX (build one with `clipkit "
                                f"index FOLDER --index INDEX`)")
    if not names_index or (args.text and not several):
        return  # (--text and that one QUERY: the text itself)
    if args.server:
        raise UsageError(f"with --server the index is one the server serves: --index NAME (its name there, "
                         f"`clipkit serve` lists them), not {first}")
    if not several:
        raise UsageError(f"give a QUERY to search {first} for: clipkit search {first} QUERY (to search for the text "
                         f"{first!r}, add --text)")
    args.index, args.query = first, args.query[1:]


def _names_index(path: str) -> bool:
    """Whether a positional argument names an index: one that is there, or a name ending in .clipkit."""
    from clipkit.index import is_index

    return path.rstrip("/").endswith(".clipkit") or is_index(path)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"ports go up to 65535, got {value}")
    return value


def _progress(args) -> bool | None:
    return False if args.quiet else None  # None: bars only on a terminal


def cmd_index(args) -> int:
    from clipkit.index import is_index
    from clipkit.index.ingest import is_embedding_folder

    args.index = _index_written(args)
    if is_index(args.folder) and Path(args.folder).resolve() != Path(args.index).resolve():  # (its own: said later)
        raise UsageError(f"{args.folder} is a clipkit index, not images to index: to update it, index each folder "
                         f"`clipkit roots {args.folder}` lists into it (clipkit index FOLDER {args.folder}); to "
                         f"combine indexes, clipkit merge OUT {args.folder} ...")
    if Path(args.folder).is_dir() and is_embedding_folder(args.folder):
        return _index_embeddings(args)
    folder, table, listed_only = _index_source(args)
    with table.held() if listed_only else contextlib.nullcontext():  # (a table read once: checked, then indexed)
        if listed_only:
            _check_listed_files(table)  # a malformed table is refused before the index is touched
        return _index_from(args, folder, table, listed_only)


def _index_from(args, folder: Path | None, table, listed_only: bool) -> int:
    """`clipkit index` of its source, found out (`_index_source`)."""
    from clipkit.index import DB_FILE, Index
    from clipkit.index.lock import writer_lock

    if folder is None and (args.exclude or args.no_exclude or args.captions or args.check and table is not None):
        raise UsageError("--check, --exclude and --captions apply to folders (and --check to shards); shards and "
                         "URL tables are indexed whole, with their own captions")
    if args.exclude and args.no_exclude:
        raise UsageError("give --exclude GLOB (what to leave out from now on) or --no-exclude (nothing), not both")
    if args.no_exclude:
        args.exclude = []
    shard = _parse_shard(args.shard) if args.shard else None
    _set_pixel_limit(args.max_pixels)
    engine = _engine(args)
    index_path = Path(args.index.replace("{rank}", str(shard[0])) if shard else args.index)
    if args.check:
        existing = Index.load(index_path) if index_path.exists() else None
        if folder is None:
            return _check_shards(existing, args.folder, index_path, shard)
        return _check_index(existing, folder, index_path, args.exclude, shard, table if listed_only else None)
    _prepare_index_folder(index_path)
    with writer_lock(index_path, wait=not args.no_wait, on_wait=_waiting_notice(args)):
        index = Index.load(index_path) if (index_path / DB_FILE).exists() else None
        model = _index_model(index, args)
        created = index is None
        if created:
            index = Index(model.dim, model=model, precision=args.precision)
            index.save(index_path)  # attach first: every finished batch is then committed to disk
        with engine or contextlib.nullcontext():  # (a local Ray started for the run stops after it)
            report = _sync_source(args, index, model, (folder, table, listed_only), shard, engine)
        _structure_options(args, index, model, created)
        index.save()
    _write_skipped_log(args.skipped_log, report.skipped)
    if not report.found and shard is None:
        _warn_nothing_found(args.folder, report, index)
    if not args.quiet:
        _print_sync_summary(report, index, index_path, args.skipped_log, args.folder,
                            remembered=args.exclude is None)
        if engine is not None and engine.stats:
            shares = sorted(engine.stats["per_actor"].values(), reverse=True)
            print(f"ray: {engine.stats['actors']} actor(s) (images each: {', '.join(map(str, shares)) or 'none'}); "
                  f"{engine.stats['delivered_twice']} batch(es) delivered again after a retry, committed once")
        if created and len(index) and shard is None:  # (a first index: what to do with it)
            named = shlex.quote(str(index_path))
            print(f"search it: clipkit search {named} \"TEXT\" (or an image's path); with a web page: clipkit serve "
                  f"{named}", file=sys.stderr)
    return 0


def _warn_nothing_found(source: str, report, index) -> None:
    """SOURCE gave no image: say so, and where the folder's listing met webdataset shards further down (the
    report's `shards_seen`), how to give them."""
    from clipkit.data.folder import IMAGE_EXTENSIONS

    count, *first = report.shards_seen
    folders = sorted({os.path.dirname(path) for path in first})
    hint = (f"; it holds webdataset shards in {', '.join(folders)}{' ...' if count > len(first) else ''}: give "
            f"them as SOURCE (a folder of shards, or '{_shards_glob(source, report)}')") if count else ""
    print(f"clipkit: warning: found no images in {source} (files ending {', '.join(sorted(IMAGE_EXTENSIONS))})"
          + (": the index is empty" if len(index) == 0 else "") + hint, file=sys.stderr)


def _shards_glob(source: str, report) -> str:
    """A glob naming every webdataset shard a folder sync of `source` met (`report.shards_seen`): their folder's
    `*.tar` when they are all in one, else `source/**/*.tar` (clipkit reads `**` as any depth of folders)."""
    count, *first = report.shards_seen
    folders = {os.path.dirname(path) for path in first}
    if len(folders) == 1 and count == len(first):
        return str(Path(folders.pop()) / "*.tar")
    return str(Path(os.path.abspath(source)) / "**" / "*.tar")


def _sync_source(args, index, model, source: tuple, shard, engine):
    """Bring `index` up to date with SOURCE: a folder, a caption table, a URL table or shards."""
    from clipkit.data.urls import UrlTable

    folder, table, listed_only = source
    options = dict(batch_size=args.batch_size, workers=args.workers, progress=_progress(args), engine=engine)
    if isinstance(table, UrlTable):  # image URLs, fetched
        return index.sync_urls(table, model, shard=shard, **options)
    if folder is None:  # webdataset shards, indexed in place
        return index.sync_shards(args.folder, model, batch_size=args.batch_size, progress=_progress(args),
                                 engine=engine, shard=shard)
    options.update(exclude=args.exclude, shard=shard)
    if listed_only:
        return index.sync_table(table, model, **options)
    return index.sync_folder(folder, model, captions=table, **options)


def _set_pixel_limit(megapixels: float | None) -> None:
    """--max-pixels: Pillow's limit on the pixels of an image read (Ray's actors are handed it too)."""
    if megapixels is None:
        return
    if not 0 < megapixels <= 10_000:
        raise UsageError(f"--max-pixels is in megapixels, from 0 to 10000, got {megapixels:g}")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = int(megapixels * 1e6)


def _engine(args):
    """--engine ray: the Ray engine that embeds the images (of a folder, a table or shards); None: this
    process."""
    if args.engine == "local":
        if args.ray_address or args.ray_actors or args.ray_items_per_call:
            raise UsageError("--ray-address, --ray-actors and --ray-items-per-call go with --engine ray")
        return None
    from clipkit.encode_ray import RayEngine, require_ray

    require_ray()  # installed, or a clear message before the index is touched
    options = {"items_per_call": args.ray_items_per_call} if args.ray_items_per_call else {}
    return RayEngine(args.ray_address, actors=args.ray_actors, **options)


def _drop_encoder(index) -> None:
    """Let go of the encoder an index (and its caption collection) holds: it is loaded again when needed."""
    import gc

    for holder in (index, getattr(index, "_captions", None)):
        if holder is not None:
            holder.model = None
    gc.collect()


def _structure_options(args, index, model, created: bool, queries=None) -> None:
    """--index-type and --tune-queries (`queries`, when the caller embedded them already): switch structure,
    or build it again tuned on the given queries."""
    if queries is None and args.tune_queries:
        queries = _tune_queries(args.tune_queries, model)
    if queries is not None or (args.index_type is not None and (created or args.index_type != index.index_type)):
        index.set_index_type(args.index_type or index.index_type, sample_queries=queries)


def _tune_queries(path: str, model):
    """--tune-queries FILE: query vectors (.npy), or query texts (one a line) embedded by the index's model."""
    import numpy as np

    if not Path(path).is_file():
        raise FileNotFoundError(f"--tune-queries: no file {path}")
    if path.endswith(".npy"):
        return np.load(path)
    if model is None:
        raise UsageError("--tune-queries with texts needs the model that embeds them: give --model")
    from clipkit.encode import encode_texts

    texts = [line.strip() for line in decode_text(Path(path).read_bytes(), errors="replace").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--tune-queries: {path} holds no query text")
    return encode_texts(texts, model)


def _index_embeddings(args) -> int:
    """`clipkit index EMB_DIR`: precomputed embeddings in clip-retrieval's layout (clipkit.index.ingest)."""
    from clipkit.index import DB_FILE, Index
    from clipkit.index.ingest import embedding_dim
    from clipkit.index.lock import writer_lock

    if args.check or args.shard or args.exclude or args.no_exclude or args.captions or args.engine != "local":
        raise UsageError("--check, --shard, --exclude, --captions and --engine apply to folders of images; an "
                         "embedding folder is read whole, part by part")
    index_path = Path(args.index)
    dim = embedding_dim(args.folder)
    _prepare_index_folder(index_path)
    with writer_lock(index_path, wait=not args.no_wait, on_wait=_waiting_notice(args)):
        index = Index.load(index_path) if (index_path / DB_FILE).exists() else None
        model = _index_model(index, args) if args.model is not None or index is not None and index.model_info \
            else None
        if model is not None and model.dim != dim:
            raise ValueError(f"{args.folder} holds {dim}-d embeddings but model {model.name} makes {model.dim}-d ones")
        if index is None:
            index = Index(dim, model=model, precision=args.precision or "float16")
            index.save(index_path)
        report = index.sync_embeddings(args.folder, model, progress=_progress(args))
        queries = _tune_queries(args.tune_queries, model) if args.tune_queries else None
        _drop_encoder(index)  # the build embeds nothing: the weights (0.6 GB for ViT-B/32) leave memory first
        model = None
        _structure_options(args, index, None, False, queries)
        index.save()
    _write_skipped_log(args.skipped_log, report.skipped)
    if not args.quiet:
        captions = len(index.captions) if index.captions is not None else 0
        print(f"ingested {report.added} embedding(s), {report.unchanged} already in, {_skipped_summary(report)}; "
              f"{len(index)} in {index_path} ({index.structure}), {captions} caption(s)"
              + ("" if index.model_info else "; no model recorded: pass --model NAME for text queries"))
        _print_skipped(report.skipped, args.skipped_log)
    return 0


def _index_source(args) -> tuple[Path | None, object, bool]:
    """(folder, caption table or None, whether only the files the table lists are indexed) of `clipkit index
    SOURCE`; folder None: SOURCE names webdataset shards, or a URL table (then the table)."""
    from clipkit.data.urls import UrlTable, is_url_table
    from clipkit.index import CaptionTable
    from clipkit.data.shardspec import is_shard_spec

    if is_shard_spec(args.folder, nested=True):
        from clipkit.index.shards import local_shards

        local_shards(args.folder)  # they exist, on this machine
        return None, None, False
    source = Path(args.folder)
    if is_url_table(source, args.url_column, args.image_column):  # image URLs (and captions), fetched
        if args.captions:
            raise UsageError("a URL table brings its own captions (its caption column); --captions is for folders")
        return None, UrlTable.of(source, args.url_column or "url", args.caption_column), False
    if source.is_file():  # a caption table: the images it lists, with its captions
        _check_table_name(source)
        if args.captions:
            raise UsageError("give a caption table as SOURCE or as --captions, not both")
        table = CaptionTable.of(source, args.image_column, args.caption_column, args.root)
        return Path(table.folder), table, True
    if not source.is_dir() and any(mark in args.folder for mark in "*?["):
        raise UsageError(f"{args.folder} is a pattern: give the folder (searched recursively; --exclude GLOB leaves "
                         "files out), or webdataset shards as shards/{000000..000009}.tar")
    if not source.is_dir():
        raise FileNotFoundError(f"folder not found: {source}" if not source.exists() else f"not a folder: {source}")
    table = CaptionTable.of(args.captions, args.image_column, args.caption_column, args.root) if args.captions else None
    return source, table, False


def _check_listed_files(table) -> None:
    """A caption table none of whose files lies under its folder (a list of absolute paths elsewhere) is
    refused with the --root that would take them (read until the first file found there: usually one row)."""
    from clipkit.index.sync import is_under

    with table.read() as rows:
        if any(is_under(path, table.folder) and os.path.isfile(path) for path in rows):
            return
        outside = (os.path.dirname(path) for path in rows if not is_under(path, table.folder))
        first = next(outside, None)
        common = functools.reduce(lambda a, b: os.path.commonpath([a, b]), outside, first) if first else None
    if common is not None:
        raise UsageError(f"no file that {table.path} lists lies under {table.folder}, the folder its paths are "
                         f"taken from: pass --root {common} (the folder the files are in)")


def _check_table_name(source: Path) -> None:
    """A file given as SOURCE that is no table clipkit reads: say what SOURCE may be."""
    from clipkit.data.urls import table_suffix
    from clipkit.index.captions import is_table

    if is_table(source):
        return
    what = ("an image file: index the folder it is in" if is_image_name(source.name) else
            "a text file whose first line is neither an http(s) URL nor an image file's path"
            if table_suffix(source) == ".txt" else "no table clipkit reads")
    raise UsageError(f"{source} is {what}; SOURCE is a folder of images, a caption or URL table (.csv, .tsv, "
                     ".jsonl, .parquet, or .gz of one; .txt of URLs or of image files) or webdataset shards (.tar)")


def _prepare_index_folder(index_path: Path) -> None:
    """Make the index folder (so its writer lock can be taken), refusing paths that hold something else."""
    from clipkit.index import DB_FILE

    if index_path.exists() and not index_path.is_dir():
        raise ValueError(f"{index_path} exists and is not a folder; choose another index path")
    if index_path.is_dir() and not (index_path / DB_FILE).exists() and any(
            p.name != "writer.lock" for p in index_path.iterdir()):
        raise ValueError(f"{index_path} is a non-empty folder that is not a clipkit index; choose another path")
    index_path.mkdir(parents=True, exist_ok=True)


def _waiting_notice(args):
    def notice(message: str) -> None:
        if not args.quiet:
            print(f"clipkit: {message}; waiting (or use --no-wait) ...", file=sys.stderr, flush=True)
    return notice


def _index_model(index, args):
    """The model to index with: the index's own (a `RecordedModel`: loaded when something is to be embedded,
    so that a run with nothing new never loads it) when --model is not given or names it, else
    --model/--pretrained (checked against the index)."""
    from clipkit.recorded import RecordedModel, names_the_record

    if index is not None and (args.model is None or names_the_record(index.model_info, args.model, args.pretrained)):
        return RecordedModel(index.model_info, device=args.device)
    from clipkit.models import DEFAULT_MODEL, load_model, warn_untrained

    model = load_model(args.model or DEFAULT_MODEL, args.pretrained, device=args.device)
    warn_untrained(model)
    if index is not None:
        index.check_model(model, writing=True)
    return model


def _print_sync_summary(report, index, index_path: Path, skipped_log: str | None, source: str,
                        remembered: bool = False) -> None:
    """`source`: the SOURCE synced; `remembered`: the folder's exclude globs were not given this run but
    remembered from an earlier one."""
    print(f"indexed {report.embedded} image(s) ({report.added} new, {report.updated} changed), "
          f"{report.moved} moved, {report.unchanged} unchanged, {report.removed} removed, "
          f"{_skipped_summary(report)}; {len(index)} in {index_path} ({index.structure})")
    if remembered and report.excluded:
        print(f"  left out what matches --exclude {' '.join(map(repr, report.excluded))}, as remembered for the "
              "folder (--no-exclude indexes it again)")
    if report.captions is not None:
        moved = f"{report.captions.moved} moved with their images, " if report.captions.moved else ""
        print(f"captions: {report.captions.added} embedded, {moved}{report.captions.kept} unchanged, "
              f"{report.captions.removed} removed; {len(index.captions)} in the index")
    _print_skipped(report.skipped, skipped_log)
    count, *shards = report.shards_seen
    if count and report.found:  # (found nothing: the warning said it)
        print(f"  the folder also holds {count} webdataset shard(s) ({', '.join(shards)}{', ...' if count > 3 else ''}),"
              " which indexing a folder leaves out: index them as SOURCE (a .tar, a glob such as "
              f"'{_shards_glob(source, report)}', or their folder)", file=sys.stderr)
    for gone, count in report.orphaned.items():
        print(f"  {count} item(s) of {gone}, which no longer exists, are still indexed: index its new place to "
              f"re-point them, or drop them with `clipkit remove --missing --index {index_path}`", file=sys.stderr)


def cmd_remove(args) -> int:
    from clipkit.index import Index
    from clipkit.index.lock import writer_lock

    if not args.paths and not args.missing:
        raise UsageError("give the PATHs whose items to drop, or --missing")
    if not Path(args.index).exists():
        raise FileNotFoundError(f"no index at {args.index}")
    if not _removal_confirmed(args):
        print("nothing removed", file=sys.stderr)
        return 1
    with writer_lock(args.index, wait=not args.no_wait, on_wait=_waiting_notice(args)):
        index = Index.load(args.index)
        removed, matched_nothing, still_there = index.prune_missing(_progress(args)) if args.missing else 0, [], []
        for path in args.paths:
            count = index.remove_folder(path, _progress(args))
            removed += count
            matched_nothing += [] if count else [path]
            still_there += [path] if count and os.path.exists(path) else []
        index.save()
    if not args.quiet:
        print(f"removed {removed} item(s); {len(index)} left in {args.index}"
              + (f" (nothing indexed at or under {', '.join(matched_nothing)})" if matched_nothing else ""))
        if still_there:
            print(f"note: still on disk: {', '.join(still_there)}; the next `clipkit index` of their folder adds them "
                  "back (--exclude GLOB leaves them out for good)")
    return 0


def _removal_confirmed(args) -> bool:
    """At a terminal, `clipkit remove PATH...` asks before PATHs at or above every indexed folder and shard, and
    so holding every item of the index (`clipkit remove /`, `~`, a typo's parent), drop them all; --yes, or a
    script, does not."""
    from clipkit.index import Index
    from clipkit.index.sync import is_under

    if args.yes or not args.paths or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return True  # (not asked: the index is not even opened for it)
    index = Index.load(args.index)
    if not len(index):
        return True
    targets = [os.path.abspath(os.path.expanduser(path)) for path in args.paths]
    held = sum(root["items"] for root in index.roots() if any(is_under(root["path"], t) for t in targets))
    held += sum(index.count_with_prefix(shard + "#") for shard in index.store.shards()  # (indexed in place)
                if any(is_under(shard, t) for t in targets))
    if held < len(index):
        return True
    print(f"{' '.join(args.paths)} hold(s) all {len(index)} items of {args.index}: drop them all? (the files stay; "
          "indexing them again embeds them again) [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        return input().strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_export(args) -> int:
    from clipkit.index import Index, is_index

    if len(args.paths) > 2 or (len(args.paths) == 2 and args.index):
        raise ValueError("export takes INDEX OUT, or OUT with --index INDEX")
    index, out = args.paths if len(args.paths) == 2 else (args.index or DEFAULT_INDEX, args.paths[0])
    if len(args.paths) == 1 and not args.index and is_index(out):
        raise UsageError(f"{out} is an index: name the folder to write too (clipkit export {out} OUT)")
    done = Index.load(index).export(out, part_size=args.part_size, progress=_progress(args))
    if not args.quiet:
        more = f" and {done['more_captions']} further caption(s)" if done["more_captions"] else ""
        print(f"exported {done['rows']} embedding(s) in {done['parts']} part(s), {done['captions']} with a "
              f"caption's embedding{more}, to {out}" + (" (went on from a stopped export)" if done["resumed"] else "")
              + (f"; {done['damaged']} damaged embedding(s) left out (re-index their images)" if done["damaged"]
                 else ""))
    return 0


def cmd_roots(args) -> int:
    from clipkit.index import Index

    index_path = _one_index(args)
    index = Index.load(index_path)
    roots = index.roots()
    for root in roots:
        print(f"{root['items']:>8}  {root['path']}{'' if root['exists'] else '  (missing)'}{_leaving_out(root)}")
    others = len(index) - sum(root["items"] for root in roots)
    if others and not args.quiet:  # (shards, URL tables, embeddings, API adds: no folder of their own)
        print(f"{others:>8}  items of no indexed folder (shards, URLs, ingested embeddings, added by the API)")
    if not len(index) and not args.quiet:
        print(f"no folder is indexed in {index_path}: it is empty", file=sys.stderr)
    return 0


def _leaving_out(folder: dict) -> str:
    """'  (leaving out: GLOB, ...)' for a folder with remembered --exclude globs."""
    return f"  (leaving out: {', '.join(folder['exclude'])})" if folder.get("exclude") else ""


def cmd_info(args) -> int:
    from clipkit.index import Index

    about = Index.load(_one_index(args)).describe()
    if args.json:
        print(json.dumps(about, ensure_ascii=False))
        return 0
    model, tuning = about["model"] or {}, about["tuning"]
    per_item = f", {about['vectors_per_item']} vectors an item" if about["vectors_per_item"] > 1 else ""
    lines = [("index", f"{about['path']} (format {about['format_version']}, generation {about['generation']})"),
             ("items", f"{about['items']} ({about['dim']}-d {about['dtype']}{per_item})"),
             ("captions", str(about["captions"])),
             ("model", _model_line(model) if model else "none recorded (vectors given)"),
             ("structure", about["structure"] + (f" (index type {about['index_type']})"
                                                 if about["index_type"] != "flat" else " (exact)"))]
    if tuning:
        lines.append(("tuned", f"recall@10 {tuning['estimated_recall']:.3f} (target {tuning['target']}), estimated "
                               f"on the half of {tuning['n_queries']} {tuning['queries']} that the choice never saw"))
        if tuning.get("deep_recall") is not None:
            lines.append(("deeper", f"searches for more than 10: recall@25/50/100 ≥ {tuning['deep_recall']:.3f} on "
                                    "the same half"))
    lines += [("folders", f"{'' if f['exists'] else '(missing) '}{f['path']}{_leaving_out(f)}")
              for f in about["folders"]]
    lines.append(("on disk", f"{about['bytes'] / 2**20:.1f} MiB ({about['bytes'] / max(about['items'], 1):.0f} "
                             "bytes an item)"))
    for name, text in lines:
        print(f"{name:<10} {text}")
    return 0


def cmd_models(args) -> int:
    from clipkit.catalog import WEIGHTS, available_models

    rows = [row for row in available_models() if (args.name is None or args.name.lower() in row["model"].lower())
            and (not args.offline or row["weights"] in ("bundled", "cached"))]
    if not rows:
        raise UsageError(f"no model{' that loads offline' if args.offline else ''} here is named like {args.name!r}"
                         if args.name else "no model loads offline here: the bundled ones are missing (reinstall)")
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
        return 0
    width = max(len(row["model"]) for row in rows) + 2
    print(f"{'MODEL':<{width}}{'PRETRAINED':<28}{'DIM':>5}  WEIGHTS")
    for row in rows:
        print(f"{row['model']:<{width}}{row['pretrained'] or '-':<28}{row['dim'] or '-':>5}  {WEIGHTS[row['weights']]}"
              + (", a re-ranker (--reranker)" if row.get("reranker") else ""))
    if not args.quiet:
        print("load one: --model MODEL [--pretrained PRETRAINED] (clipkit.load_model(MODEL, pretrained=PRETRAINED))",
              file=sys.stderr)
    return 0


def _model_line(model: dict) -> str:
    """`clipkit info`'s model line: its name and weights, and where they are no longer (moved or deleted)."""
    from clipkit.bundled import bundled_models
    from clipkit.recorded import gone_paths

    weights = model.get("pretrained") or ("bundled" if model.get("name") in bundled_models() else "none: random")
    gone = gone_paths(model)
    return f"{model['name']} (weights: {weights})" + (
        f"; missing: {', '.join(gone)} (moved? index once with the same weights where they are now: --model NAME "
        "--pretrained FILE, or --model FOLDER for a transformers folder; nothing is embedded again)" if gone else "")


def _parse_shard(text: str) -> tuple[int, int]:
    if text == "auto":
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            raise UsageError("--shard auto needs RANK and WORLD_SIZE (run it under torchrun), or give --shard I/N")
        text = f"{rank}/{world}"
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must be I/N (such as 0/4) or auto, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return index, count


def cmd_merge(args) -> int:
    from clipkit.index import Index

    out = Path(args.out)
    for part in args.parts:
        if not Path(part).exists():
            raise FileNotFoundError(f"no index at {part}")
    merged = Index.merge(args.parts, out=out, index_type=args.index_type)
    if not args.quiet:
        print(f"merged {len(args.parts)} index(es): {len(merged)} items in {out} ({merged.structure})")
    return 0


def _write_skipped_log(skipped_log: str | None, skipped) -> None:
    """Every skipped (path, reason) as a JSON line, streamed (a URL table may skip millions)."""
    if skipped_log:
        from clipkit._io import atomic_path

        with atomic_path(skipped_log) as temporary, open(temporary, "w", encoding="utf-8") as out:
            for path, reason in skipped:
                entry = {"path": path, "reason": reason}
                try:
                    out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                except UnicodeEncodeError:  # a name that is not UTF-8: escaped (\udcXX), the file stays UTF-8
                    out.write(json.dumps(entry) + "\n")


def _print_skipped(skipped: list[tuple[str, str]], skipped_log: str | None) -> None:
    for path, reason in skipped[:20]:
        print(f"  skipped: {reason}" if path in reason else f"  skipped {path!r}: {reason}", file=sys.stderr)
    if len(skipped) > 20:
        more = f"; all in {skipped_log}" if skipped_log else " (--skipped-log FILE lists them all)"
        print(f"  ... and {len(skipped) - 20} more skipped{more}", file=sys.stderr)


def _skipped_summary(report) -> str:
    if not report.skipped:
        return "0 skipped"
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(report.skipped_kinds.items(), key=lambda kv: -kv[1]))
    return f"{len(report.skipped)} skipped ({kinds})"


def _check_index(existing, folder: Path, index_path: Path, exclude: list[str], shard, listed) -> int:
    """`clipkit index --check`: what an update would do; nothing is written. `listed`: the caption table
    whose files alone are indexed (None: the folder's)."""
    from clipkit.index import Index

    with listed.read() if listed is not None else contextlib.nullcontext() as include:
        planner = existing if existing is not None else Index(1)  # (an empty index is falsy: len 0)
        plan = planner.plan_folder(folder, exclude=exclude, shard=shard, include=include)
    with plan:
        if existing is None:
            print(f"no index at {index_path} yet: {len(plan.new)} image file(s) would be indexed")
            return 0
        print(f"would embed {len(plan.new)} new and re-embed {len(plan.changed)} changed image(s), move "
              f"{len(plan.moved)}, remove {len(plan.gone)}; {plan.unchanged} unchanged, "
              f"{_skipped_summary(plan.report)}")
        _print_listed((("new", (p for p, _ in plan.new)), ("changed", (p for p, _ in plan.changed)),
                       ("moved", (f"{old} -> {new}" for old, new, _ in plan.moved)), ("removed", plan.gone)))
    return 0


def _print_listed(groups) -> None:
    """`--check`'s lines: each path of each (label, paths) group, as JSON text."""
    for label, paths in groups:
        for path in paths:
            print(f"  {label}: {json.dumps(str(path), ensure_ascii=False)}")


def _check_shards(existing, source: str, index_path: Path, shard) -> int:
    """`clipkit index SHARDS --check`: which shards an update would read, leave or remove; nothing is written."""
    from clipkit.index import Index
    from clipkit.index.shards import plan_shards

    plan = plan_shards(existing if existing is not None else Index(1), source, part=shard)
    if existing is None:
        print(f"no index at {index_path} yet: {len(plan.new)} shard(s) would be read and their images indexed")
        return 0
    print(f"would read {len(plan.new)} new and {len(plan.changed)} changed shard(s) (their new images embedded), "
          f"move {len(plan.moved)}, remove {len(plan.gone)} gone ({sum(plan.gone.values())} item(s)); "
          f"{len(plan.unchanged)} unchanged ({sum(plan.unchanged.values())} item(s))")
    _print_listed((("new", plan.new), ("changed", plan.changed), ("removed", list(plan.gone)),
                   ("moved", [f"{old} -> {new}" for old, new in plan.moved])))
    return 0


def _search_query(text: str, as_text: bool):
    """QUERY as an image (an http(s) URL, fetched within the URL limits; an image's name; an existing file
    that decodes as one, decoded here once) or as text."""
    from clipkit.data.images import ImageURL, is_url, read_image
    from clipkit.errors import ImageReadError

    if as_text:
        return text
    if is_image_name(text.strip()) and not is_url(text.strip()):
        if not os.path.isfile(text):
            raise FileNotFoundError(f"image file not found: {text} (to search for this text, add --text)")
        return Path(text)
    if os.path.isdir(text):
        raise UsageError(f"{text} is a folder: search takes one image file or a text (to search for this text, "
                         "add --text)")
    try:
        if is_url(text.strip()):
            from clipkit.encode import load_image

            return load_image(ImageURL(text.strip()))
        return read_image(text) if os.path.isfile(text) else text
    except ImageReadError as exc:
        raise UsageError(f"{exc} (to search for this text, add --text)") from None


def _indexed_item_query(index, text: str, picture: bool = False):
    """QUERY as an item of the index (its id as search prints it, e.g. SHARD.tar#KEY or an indexed URL, or an
    indexed file by a relative path; a shard's path may be relative): its stored embedding (no model to load),
    unless the item's file changed since it was indexed or `picture` (re-ranking scores the picture) asks for
    the image, read from its file or shard where it has one. None where QUERY names no item."""
    from clipkit.encode import load_image
    from clipkit.data.shardspec import is_shard_spec
    from clipkit.index.files import as_indexed
    from clipkit.index.shards import item_image
    from clipkit.index.vectors import storable

    text = text.strip()
    shard, _, member = text.rpartition("#")
    candidates = list(dict.fromkeys([text, os.path.abspath(text)] + ([f"{os.path.abspath(shard)}#{member}"]
                                                                      if shard and member else [])))
    found = index.find(c for c in candidates if storable(c))  # (a file name that is not UTF-8 is not an id)
    record = next((found[c] for c in candidates if c in found), None)
    if record is None:
        if shard and member and is_shard_spec(shard) and os.path.isfile(shard):
            raise UsageError(f"{text} is not in {index.path}: index its shard first (to search for this text, "
                             "add --text)")
        return None
    source = item_image(record.get("path"), record) if picture or not as_indexed(record) else None
    if source is not None:
        with contextlib.suppress(OSError, ValueError):  # (its file gone or unreadable since: what the index holds)
            return load_image(source)
    return index.embeddings([record["id"]])[0]


QUERY_ERRORS = (UsageError, FileNotFoundError, ValueError, OSError)  # (a QUERY's own: said, and the others searched)


def cmd_search(args) -> int:
    from clipkit.index import Index

    _index_read_first(args)
    _check_queries(args)
    if args.server:
        return _search_server(args)
    args.index = args.index or DEFAULT_INDEX
    index = Index.load(args.index)  # (before torch is imported: a wrong --index is said at once)
    if args.under is not None and not index.count_under(args.under):
        raise UsageError(f"no indexed item lies under {args.under} (`clipkit roots` lists the indexed folders)")
    if len(index) == 0:
        print(f"clipkit: warning: {args.index} is empty: index a folder of images into it first", file=sys.stderr)
    if args.queries is None and len(args.query) == 1:
        (query,) = _queries(index, args.query, args)  # (said before a model loads)
        if isinstance(query, Exception):
            raise query
        from clipkit.search import search

        _print_hits(search(query, index, **_search_options(index, args)), args)
        return 0
    options, failed = _search_options(index, args, load=True), 0
    if args.queries == "-" and sys.stdin.isatty() and not args.quiet:
        print("clipkit: a query a line (text, an image's path or URL); Ctrl-D ends", file=sys.stderr)
    try:
        for lines in _query_groups(args):
            for line, answer in zip(lines, _answers(index, _queries(index, lines, args), options)):
                failed += isinstance(answer, Exception)
                _print_hits(answer, args, query=line)
            sys.stdout.flush()  # (a reader waiting on each answer: a program, or someone typing)
    except KeyboardInterrupt:  # (Ctrl-C ends a session of queries: no word about resuming)
        return 130
    return 2 if failed else 0


def _search_server(args) -> int:
    """`clipkit search --server URL`: each QUERY sent to the server (a text, or an image file's or URL's bytes:
    read here, so that the server needs no access to them), its hits printed as a local search prints them."""
    from clipkit.client import Server, ServerError

    if args.reranker or args.device:
        raise UsageError(f"--{'reranker' if args.reranker else 'device'} is the server's own with --server "
                         "(clipkit serve --reranker / --device)")
    server = Server(args.server, index=args.index)
    options = {"k": args.k, "rerank": args.rerank, "rerank_k": args.rerank_k,
               "modality": "text" if args.captions else "image",  # (the server's paths are absolute:)
               "under": None if args.under is None else os.path.abspath(os.path.expanduser(args.under))}
    if args.queries is None and len(args.query) == 1:  # one QUERY: its error is the run's
        _print_hits(_ask_server(server, args.query[0], args.text, options), args)
        return 0
    failed = 0
    for lines in _query_groups(args):
        for line in lines:
            try:
                answer = _ask_server(server, line, args.text, options)
            except ServerError as exc:
                if exc.every_query:
                    raise  # (said once)
                answer = exc
            except QUERY_ERRORS as exc:
                answer = exc
            failed += isinstance(answer, Exception)
            _print_hits(answer, args, query=line)
        sys.stdout.flush()
    return 2 if failed else 0


def _ask_server(server, text: str, as_text: bool, options: dict) -> list:
    """The server's hits for QUERY: its text; the bytes of the image it names (a file here, or a URL fetched
    here within the URL limits), as `_search_query` reads QUERY for a local search; or, for an image file
    that is not here or an item id (SHARD.tar#KEY), the item the server indexes under that name."""
    from clipkit.client import ServerError
    from clipkit.data.images import ImageURL, is_url
    from clipkit.data.shardspec import is_shard_spec

    stripped = text.strip()
    shard, _, member = stripped.rpartition("#")
    if not as_text and is_url(stripped):
        try:
            picture = ImageURL(stripped).read_bytes()
        except ValueError as exc:
            raise UsageError(f"{exc} (to search for this text, add --text)") from None
        return server.search(picture, **options)
    if not as_text and ((is_image_name(stripped) and not os.path.isfile(text)) or (shard and member and
                                                                                   is_shard_spec(shard))):
        item = f"{os.path.abspath(shard)}#{member}" if shard and member else os.path.abspath(stripped)
        try:
            return server.search(item=item, **options)
        except ServerError as exc:
            if exc.status != 404 or "no item" not in str(exc):  # (not an unknown --index, also a 404)
                raise
            raise FileNotFoundError(f"no such file here, and the server indexes no item {item} (to search for this "
                                    "text, add --text)") from None
    query = _search_query(text, as_text)
    return server.search(query if isinstance(query, str) else Path(text).read_bytes(), **options)


def _check_queries(args) -> None:
    """QUERYs or --queries FILE (a file, a pipe or -), not both and not neither."""
    wanted = "(give a text file of queries, one a line, or - to read them from stdin)"
    if bool(args.query) == (args.queries is not None):
        raise UsageError("give a QUERY (or several), or --queries FILE, not both" if args.query else
                         "give a QUERY, or --queries FILE: a text file of queries, one a line (- reads stdin)")
    if args.queries in (None, "-"):
        return
    if os.path.isdir(args.queries):
        raise UsageError(f"--queries {args.queries} is a folder {wanted}")
    if not os.path.exists(args.queries):
        raise FileNotFoundError(f"--queries {args.queries}: no such file {wanted}")


def _search_options(index, args, load: bool = False) -> dict:
    """`search()`'s options from the command line: the index's model on --device (`load`: in any case, so that a
    model that does not load is said once, not for each query), the --reranker loaded."""
    from clipkit.search import index_model

    model = index_model(index, device=args.device) if (load or args.device is not None) and index.model_info \
        else None
    reranker = None
    if args.reranker:
        from clipkit.rerankers import load_reranker

        reranker = load_reranker(args.reranker, device=args.device)
    return {"k": args.k, "model": model, "rerank": args.rerank or reranker is not None, "rerank_k": args.rerank_k,
            "modality": "text" if args.captions else "image", "reranker": reranker, "under": args.under}


def _answers(index, queries: list, options: dict) -> list:
    """The hits of each of `queries` (searched together), or the error it is, or meets: a query that cannot be
    searched (an image query re-ranked where the hits have no captions) fails alone."""
    from clipkit.search import search_batch

    good = [query for query in queries if not isinstance(query, Exception)]
    try:
        answers = iter(search_batch(good, index, **options))
    except QUERY_ERRORS as exc:
        answers = iter([exc] if len(good) == 1 else [_answers(index, [query], options)[0] for query in good])
    return [query if isinstance(query, Exception) else next(answers) for query in queries]


def _queries(index, lines: list[str], args) -> list:
    """Each of `lines` as a query (an indexed item, an image file or URL, else text), or the error it is (an
    image file not found or that does not decode, a folder)."""
    found = []
    for line in lines:
        try:
            query = None if args.text else _indexed_item_query(index, line, args.rerank or bool(args.reranker))
            found.append(_search_query(line, args.text) if query is None else query)
        except QUERY_ERRORS as exc:
            found.append(exc)
    return found


def _query_groups(args, most: int = 64):
    """The QUERYs of a run of several, in groups for `search_batch`: the arguments, or the lines of --queries
    (blank ones left out), as many as are there without waiting (at most `most`): a file goes `most` lines at
    a time, someone typing (or a program writing queries one at a time) gets each answer at once."""
    if args.queries is None:
        yield args.query
        return
    with contextlib.ExitStack() as stack:
        if args.queries == "-":
            stream = sys.stdin
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="surrogateescape")  # (file names that are not UTF-8 kept as they are)
        else:
            encoding = file_encoding(args.queries)  # (UTF-8, or the UTF-16 of a byte order mark)
            stream = stack.enter_context(open(args.queries, encoding=encoding,
                                              errors="surrogateescape" if encoding == "utf-8-sig" else "replace"))
        group = []
        for line in _query_lines(stream, args.queries):
            if isinstance(line, Exception):  # (the lines before it answered first)
                yield from [group] if group else []
                raise line
            if line.strip():
                group.append(line)
            if group and (len(group) >= most or not _more_waiting(stream)):
                yield group
                group = []
        if group:
            yield group


MAX_QUERY_LINE = 65_536  # characters: a text (the model reads its first 77 tokens) or a path is far shorter


def _query_lines(stream, name: str):
    """The lines of a --queries stream, without their line ends; at a NUL byte or a line past MAX_QUERY_LINE
    (a binary file given by mistake, not queries), the error that stops the run, and no more."""
    for number, line in enumerate(iter(lambda: stream.readline(MAX_QUERY_LINE + 1), ""), 1):
        if "\x00" in line or (len(line) > MAX_QUERY_LINE and not line.endswith("\n")):
            what = "holds NUL bytes" if "\x00" in line else f"is over {MAX_QUERY_LINE:,} characters"
            yield UsageError(f"--queries {name}: line {number} {what}: give a text file of queries, one a line")
            return
        yield line.rstrip("\r\n").removeprefix("\ufeff" if number == 1 else "")  # (a mark on stdin)


def _more_waiting(stream) -> bool:
    """Whether `stream` has more to read at once (a file, or lines already written to a pipe)."""
    import select

    try:
        return bool(select.select([stream], [], [], 0)[0])
    except (OSError, ValueError, TypeError):  # (no file descriptor, or one select cannot wait on: a line at a time)
        return False


def _print_hits(hits, args, query: str | None = None) -> None:
    """One query's hits (or, in a run of several, its error) as --json, --paths or lines of rank, score and
    path; a QUERY of several goes under a '# QUERY' line (--json: a JSON object with the query)."""
    query = None if query is None else printable(query)  # (a file name that is not UTF-8, as \\xNN)
    if isinstance(hits, Exception):
        message = printable(" ".join(str(hits).split()) or type(hits).__name__)
        print(f"clipkit: error: {query}: {message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"query": query, "error": message}, ensure_ascii=False))
        return
    if args.json:
        found = [hit.to_dict() for hit in hits]
        print(json.dumps(found if query is None else {"query": query, "hits": found}, ensure_ascii=False))
        return
    if query is not None and not args.paths:
        print(f"# {query}")
    for rank, hit in enumerate(hits, 1):
        where = hit.path if hit.path is not None else hit.id
        if args.paths:
            print(where)
        elif args.captions:
            print(f"{rank:>3}  {hit.score:7.4f}  {hit.metadata.get('caption')}  ({where})")
        else:
            print(f"{rank:>3}  {hit.score:7.4f}  {where}")
    if query is not None:
        print()


def cmd_synth(args) -> int:
    import time

    from clipkit.data.synthetic import MAX_SIZE, write_synthetic

    if not 16 <= args.size <= MAX_SIZE:
        raise ValueError(f"--size must be from 16 to {MAX_SIZE} pixels, got {args.size}")
    there = next(Path(args.out_dir).glob(f"{args.split}[-.]*"), None) if Path(args.out_dir).is_dir() else None
    if there is not None:  # (a folder of shards or images that an index or a training run may be reading)
        raise ValueError(f"{args.out_dir} already holds the {args.split} split ({there.name}, ...): write into another "
                         "folder or choose another --split (nothing is overwritten)")
    start = time.perf_counter()
    written = write_synthetic(args.out_dir, args.n, seed=args.seed, split=args.split, size=args.size,
                              layout=args.format, image_format=args.image_format, maxcount=args.shard_size,
                              workers=args.workers, progress=_progress(args))
    seconds = time.perf_counter() - start
    if not args.quiet:
        what = f"{len(written)} shard(s) ({args.split}.json lists them)" if args.format == "shards" else "a folder"
        print(f"wrote {args.n} {args.split} images as {what} in {args.out_dir} "
              f"in {seconds:.1f}s ({args.n / seconds:.0f} images/s)")
    return 0


def cmd_shards(args) -> int:
    from clipkit._io import SkipList
    from clipkit.data.shards import samples_from_source, write_shards
    from clipkit.data.urls import table_suffix

    source = Path(args.source)
    skipped = SkipList()  # (bounded memory)
    if not (source.is_dir() or source.is_file()):
        raise FileNotFoundError(f"source not found: {source}")
    if source.is_file() and table_suffix(source) == ".txt":
        raise UsageError(f"{source}: a .txt list of images has no captions, which shards need; give a folder with "
                         "NAME.txt captions beside the images, or a .csv/.jsonl/.parquet with a caption column")
    samples = samples_from_source(source, skipped, args.image_column, args.caption_column)
    written = write_shards(samples, args.out_dir, prefix=args.prefix, maxcount=args.shard_size,
                           progress=_progress(args))
    if not written:
        raise ValueError(f"no captioned images found in {source} ({len(skipped)} skipped)")
    _write_skipped_log(args.skipped_log, skipped)
    if not args.quiet:
        print(f"wrote {len(written)} shard(s) to {args.out_dir} ({args.prefix}.json lists them); "
              f"{len(skipped)} skipped")
    _print_skipped(skipped, args.skipped_log)
    return 0


def cmd_demo(args) -> int:
    from clipkit.demo import print_results, run_demo

    out, results = run_demo(args.out, n_images=args.n, model_name=args.model, k=args.k, progress=_progress(args))
    if not args.quiet:
        print_results(results)
        print(f"\nimages, index and results grid in {out}/ (open {out / 'results.png'})")
    return 0


def cmd_eval(args) -> int:
    from clipkit.evaluate import run_benchmark

    run_benchmark(args.dataset, root=args.root, captions=args.captions, split=args.split, n_images=args.n_images,
                  seed=args.seed, model=args.model, pretrained=args.pretrained, rerank=args.rerank,
                  rerank_k=args.rerank_k, weight=args.weight, batch_size=args.batch_size, device=args.device,
                  json_path=args.json, reranker=args.reranker, binding_pairs=args.binding)
    return 0


def cmd_serve(args) -> int:
    try:
        from clipkit.serve import ServeConfig, parse_index_spec, serve
        from clipkit.serve.token import server_token
    except ImportError as exc:
        raise ValueError(f"clipkit serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'clipkit[serve]'") from None
    specs = args.indexes + args.index or [DEFAULT_INDEX]
    for spec in specs:
        path = parse_index_spec(spec)[1]
        if not Path(path).exists():
            raise FileNotFoundError(f"no index at {path}: build one with `clipkit index FOLDER --index {path}`")
    if args.front:
        from clipkit.serve.app import check_front_dir

        check_front_dir(args.front)
    if not 0 <= args.inline_images <= 1024:
        raise UsageError("--inline-images must be between 0 (off) and 1024 pixels")
    config = ServeConfig(max_k=args.max_k, max_body_bytes=args.max_body_mb * 2**20,
                         max_image_bytes=args.max_image_mb * 2**20,
                         allow_image_urls=args.allow_image_urls, cors_origins=args.cors,
                         max_result_ids=args.max_result_ids, front_dir=args.front, inline_images=args.inline_images,
                         token=server_token(args.token))
    if args.tls_key and not args.tls_cert:
        raise UsageError("--tls-key goes with --tls-cert (the certificate it is the key of)")
    serve(specs, host=args.host, port=args.port, config=config, device=args.device, reranker=args.reranker,
          log_level="warning" if args.quiet else "info",
          tls=(args.tls_cert, args.tls_key) if args.tls_cert else None, show_token=args.token == "auto")
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from clipkit.train import TrainConfig, train

    last = train(TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}))
    if not args.quiet and last and int(os.environ.get("RANK", "0")) == 0:
        val = last.get("val", {})
        recall = f", val t2i R@1/5/10 {val['t2i_R@1']:.3f}/{val['t2i_R@5']:.3f}/{val['t2i_R@10']:.3f}" if val else ""
        print(f"step {last['step']}: loss {last['loss']:.4f}{recall}; checkpoints in {args.out}")
    return 0


def cmd_train_rerank(args) -> int:
    from clipkit.rerank_train import RerankConfig, train_rerank

    config = RerankConfig(steps=args.steps, captions=args.captions, k=args.k, random=args.random, width=args.width,
                          seed=args.seed, lr=args.lr, kind=args.kind, i2t_weight=args.i2t_weight)
    report = train_rerank(args.model, args.data, args.out, pretrained=args.pretrained, gallery_size=args.gallery_size,
                          config=config, device=args.device, progress=_progress(args) is not False)
    if not args.quiet:
        trained = (f"loss {report['loss_first_50']} -> {report['loss_last_50']}" if report["galleries"] else
                   f"the model's own, fitted on {report['weights_fitted_on']} galleries of this data")
        print(f"re-ranking head: {trained}, cosine weight {report['rerank_weight']} (image -> text "
              f"{report['rerank_weight_i2t']}); wrote {args.out} (use it as --pretrained with --model {args.model}, "
              f"or as --reranker)")
    return 0


COMMANDS = {"index": cmd_index, "search": cmd_search, "synth": cmd_synth, "shards": cmd_shards, "train": cmd_train,
            "demo": cmd_demo, "eval": cmd_eval, "serve": cmd_serve, "merge": cmd_merge,
            "train-rerank": cmd_train_rerank, "remove": cmd_remove, "roots": cmd_roots,
            "export": cmd_export, "info": cmd_info, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    from clipkit.errors import ClipkitError

    package_log = logging.getLogger("clipkit")
    saved_level = package_log.level  # restored: main() may run inside a longer-lived process
    words = sys.argv[1:] if argv is None else argv
    verbose = "-v" in words or "--verbose" in words
    from clipkit import _progress

    try:
        args = build_parser(_command_in(words)).parse_args(words)
        _progress.lines = not getattr(args, "quiet", False) and not sys.stderr.isatty()  # (a log: a line a minute)
        if args.command is None:
            raise UsageError(f"a command is required: {', '.join(COMMANDS)} (see `clipkit --help`)")
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="clipkit: %(levelname)s: %(message)s")
        if args.verbose:
            package_log.setLevel(logging.INFO)
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader of our output went away (`clipkit search ... | head -1`): not an error
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no second error at exit)
        return 0
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, ClipkitError, OSError,
            sqlite3.DatabaseError) as exc:
        if isinstance(exc, sqlite3.DatabaseError):  # damage met after an index was opened
            from clipkit.index.store import translate

            exc = translate(exc, None)
        message = printable(" ".join(str(exc).split()) or type(exc).__name__)
        print(f"clipkit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clipkit: interrupted; finished batches are kept, run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so, with the traceback under -v
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"clipkit: internal error: {type(exc).__name__}: {exc}"
              + ("" if verbose else " (run with -v for the traceback, and please report it)"), file=sys.stderr)
        return 1
    finally:
        package_log.setLevel(saved_level)
        _progress.lines = False


if __name__ == "__main__":
    sys.exit(main())
