"""Tokenize text into token shards + meta.json for gpt3d (GPT-2 BPE, uint16 ids).

    python recipes/prepare.py                              # bundled Shakespeare, in place
    python recipes/prepare.py --out data/mine a.txt texts/ # files and dirs (*.txt, recursive)
    python recipes/prepare.py --out data/fw --format llmc --hf-dataset HuggingFaceFW/fineweb \\
        --hf-config sample-10BT                            # streamed from the hub, llm.c shards
    python recipes/prepare.py --out data/local --hf-dataset parquet \\
        --hf-data-files 'corpus/*.parquet'                 # local files, same code path

Every file (or dataset record) is one document; documents are joined with <|endoftext|>.
Val is whole documents (chosen by a seeded shuffle) when there are several, else the end of the
token stream; --split-by forces one or the other. Input is streamed and tokenized by --workers
processes; a progress bar shows throughput and ETA. Details: docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a source checkout

from gpt3d.errors import UserError  # noqa: E402
from gpt3d.prepare import BATCH_BYTES, SHARD_TOKENS, SPLIT_BY, prepare  # noqa: E402
from gpt3d.progress import Progress  # noqa: E402
from gpt3d.shards import FORMATS  # noqa: E402
from gpt3d.sources import (  # noqa: E402
    file_bytes,
    file_pieces,
    find_text_files,
    hf_pieces,
    hf_total,
    open_hf_dataset,
)

BUNDLED = REPO / "recipes" / "data" / "shakespeare"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    cpus = len(os.sched_getaffinity(0))
    p.add_argument(
        "--workers", type=int, default=cpus, help=f"tokenizing processes (default {cpus})"
    )
    p.add_argument(
        "--shard-tokens",
        type=int,
        default=SHARD_TOKENS,
        help="tokens per shard file; a split that fits in one is {split}.bin (0 = always one)",
    )
    p.add_argument(
        "--format", choices=FORMATS, default="raw", help="raw uint16, or llmc (llm.c header)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    hf = p.add_argument_group("Hugging Face dataset (needs `pip install 'gpt3d[hf]'`)")
    hf.add_argument(
        "--hf-dataset",
        help="hub name (HuggingFaceFW/fineweb), builder (parquet, json) with --hf-data-files, "
        "a local directory of such files, or a Dataset.save_to_disk directory",
    )
    hf.add_argument("--hf-config", help="dataset config, e.g. sample-10BT for fineweb")
    hf.add_argument("--hf-split", default="train", help="dataset split to read")
    hf.add_argument("--hf-data-files", nargs="+", help="files (globs) for a builder name")
    hf.add_argument("--hf-limit", type=int, help="stop after this many records")
    hf.add_argument("--hf-text-field", default="text", help="record field holding the text")
    hf.add_argument(
        "--hf-download",
        action="store_true",
        help="download/cache the whole split first instead of streaming it",
    )
    args = p.parse_args(argv)
    if args.inputs and args.hf_dataset:
        p.error("pass either text inputs or --hf-dataset, not both")
    if (args.inputs or args.hf_dataset) and args.out is None:
        p.error("--out is required with inputs or --hf-dataset (the default is the bundled corpus)")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:  # user mistakes: print the message (it says the fix), no traceback
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> dict:
    workers = args.workers
    if args.hf_dataset:
        ds = open_hf_dataset(
            args.hf_dataset, args.hf_split, args.hf_config, args.hf_data_files, not args.hf_download
        )
        pieces = hf_pieces(ds, args.hf_limit, args.hf_text_field)
        total, unit = hf_total(ds, args.hf_split, args.hf_limit), "docs"
        source = [
            f"hf:{args.hf_dataset}:{args.hf_config}:{args.hf_split}:limit={args.hf_limit}"
            + (f":files={','.join(args.hf_data_files)}" if args.hf_data_files else "")
        ]
    else:
        inputs = args.inputs or [BUNDLED / "texts"]
        files = find_text_files(inputs)
        pieces, total, unit = file_pieces(files), file_bytes(files), "MB"
        source = (
            list(args.inputs) if args.inputs else [(BUNDLED / "texts").relative_to(REPO).as_posix()]
        )
        if total <= 16 * BATCH_BYTES:
            workers = 1  # ~1 s of work: less than starting worker processes costs
    progress = None if args.quiet else Progress(total, unit)
    out = args.out or BUNDLED
    return prepare(
        pieces,
        out,
        source,
        args.val_fraction,
        args.split_by,
        args.seed,
        workers,
        args.shard_tokens,
        args.format,
        progress,
    )


if __name__ == "__main__":
    sys.exit(main())
