"""Tokenize text into train.bin / val.bin / meta.json for gpt3d (GPT-2 BPE, uint16 ids).

    python recipes/prepare.py                              # bundled Shakespeare, in place
    python recipes/prepare.py --out data/mine a.txt texts/ # files and dirs (*.txt, recursive)
    python recipes/prepare.py --out data/owt --hf-dataset Skylion007/openwebtext --hf-limit 100000

Every file (or dataset record) is one document; documents are joined with <|endoftext|>.
Val is whole documents (chosen by a seeded shuffle) when there are several, else the end of the
token stream; --split-by forces one or the other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt3d.prepare import SPLIT_BY, find_text_files, hf_texts, prepare, read_texts

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "recipes" / "data" / "shakespeare"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("inputs", nargs="*", help="text files and/or directories (*.txt, recursive)")
    p.add_argument("--out", type=Path, help=f"output directory (default with no inputs: {BUNDLED})")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens for val")
    p.add_argument(
        "--split-by",
        choices=SPLIT_BY,
        default="auto",
        help="auto: documents if there are >= 2, else tokens (end of the stream)",
    )
    p.add_argument("--seed", type=int, default=1337, help="seed of the val document choice")
    p.add_argument("--progress-mb", type=float, default=64.0, help="progress line every N MB")
    hf = p.add_argument_group("Hugging Face dataset (needs `pip install datasets`; streams)")
    hf.add_argument("--hf-dataset", help="e.g. Skylion007/openwebtext, HuggingFaceFW/fineweb")
    hf.add_argument("--hf-config", help="dataset config, e.g. sample-10BT for fineweb")
    hf.add_argument("--hf-split", default="train", help="dataset split to read")
    hf.add_argument("--hf-limit", type=int, help="stop after this many records")
    hf.add_argument("--hf-text-field", default="text", help="record field holding the text")
    args = p.parse_args()
    if args.inputs and args.hf_dataset:
        p.error("pass either text inputs or --hf-dataset, not both")
    if (args.inputs or args.hf_dataset) and args.out is None:
        p.error("--out is required with inputs or --hf-dataset (the default is the bundled corpus)")
    return args


def main() -> None:
    args = parse_args()
    try:
        run(args)
    except ValueError as e:  # user mistakes: print the message (it says the fix), no traceback
        sys.exit(f"prepare: error: {e}")


def run(args: argparse.Namespace) -> None:
    if args.hf_dataset:
        texts = hf_texts(
            args.hf_dataset, args.hf_split, args.hf_limit, args.hf_text_field, args.hf_config
        )
        source = [f"hf:{args.hf_dataset}:{args.hf_config}:{args.hf_split}:limit={args.hf_limit}"]
    elif args.inputs:
        texts, source = read_texts(find_text_files(args.inputs)), list(args.inputs)
    else:
        texts = read_texts(find_text_files([BUNDLED / "texts"]))
        source = [(BUNDLED / "texts").relative_to(REPO).as_posix()]
    out = args.out or BUNDLED
    prepare(texts, out, source, args.val_fraction, args.split_by, args.seed, args.progress_mb)


if __name__ == "__main__":
    main()
