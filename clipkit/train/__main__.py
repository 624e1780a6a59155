"""`python -m clipkit.train ...` (what torchrun starts): the same as `clipkit train ...`."""

import sys

from clipkit.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
