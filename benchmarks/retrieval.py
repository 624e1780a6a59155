"""Retrieval benchmark: Recall@1/5/10 text->image and image->text, ITC alone and ITM re-ranked.

    python benchmarks/retrieval.py --dataset synthetic --model clipkit-demo --rerank
    python benchmarks/retrieval.py --dataset flickr30k --root /data/flickr30k-images \\
        --captions /data/dataset_flickr30k.json --model ViT-B-32 --pretrained laion2b_s34b_b79k
    python benchmarks/retrieval.py --dataset wds --root 'shards/test-{000000..000004}.tar'

Prints a markdown table and the seconds spent in each stage; --json OUT writes
{"itc": {"t2i": {"R@1": ..}, "i2t": {..}}, "rerank": {..}, "dataset", "model", "n_images", "n_texts", ...}.
The same as `clipkit eval` (the same options, the same code).
"""

import sys

from clipkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
