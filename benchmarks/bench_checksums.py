"""What content checksums cost: a GPT-2 (124M) checkpoint with its AdamW moments written by
DCP's own FileSystemWriter and by gpt3d's ChecksumWriter (crc32 of every byte as it is
written), alternated round by round in one process; then what checking costs on resume
(crc32 of every file, read back from the page cache) and the dataset fingerprint.

    python benchmarks/bench_checksums.py            # ~3 min, 1.5 GB in a temp directory
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from common import REPO, arg_parser, columns, machine, median, table, write_results

sys.path.insert(0, str(REPO))
from gpt3d.checkpoint_safety import file_checksum  # noqa: E402
from gpt3d.integrity import ChecksumWriter, collect_checksums, dataset_fingerprint  # noqa: E402
from gpt3d.model import GPT, preset_config  # noqa: E402

warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)


def state(preset: str) -> dict:
    """{model, optim}: the preset's parameters and two AdamW moments, fp32, random."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT(preset_config(preset)).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied: stored once, as wte.weight
    g = torch.Generator().manual_seed(0)
    model = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    optim = {f"{k}.{m}": torch.randn(s, generator=g) for k, s in shapes.items() for m in "ab"}
    return {"model": model, "optim": optim}


def timed_save(sd: dict, path: Path, checksums: bool) -> float:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    writer = ChecksumWriter(path) if checksums else dcp.FileSystemWriter(path)
    t0 = time.perf_counter()
    dcp.save(sd, storage_writer=writer, no_dist=True)
    if checksums:
        collect_checksums(path)  # rank 0's share: merge the sidecar, crc32 of the index
    return time.perf_counter() - t0


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    sd = state(a.preset)
    n_bytes = sum(t.numel() * 4 for part in sd.values() for t in part.values())
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for r in range(a.rounds):
            plain = timed_save(sd, root / "plain", checksums=False)
            crc = timed_save(sd, root / "crc", checksums=True)
            ratios.append(crc / plain)
            rows.append({"round": r, "plain_s": plain, "checksum_s": crc, "ratio": crc / plain})
        files = [f for f in (root / "crc").iterdir() if f.is_file()]
        t0 = time.perf_counter()
        for f in files:
            file_checksum(f)
        verify_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dataset_fingerprint(REPO / "recipes" / "data" / "shakespeare")
    fingerprint_ms = (time.perf_counter() - t0) * 1e3
    gb = n_bytes / 1e9
    notes = [
        f"{a.preset}: {gb:.2f} GB of fp32 tensors (parameters + two AdamW moments)",
        f"saving with checksums / without: median {median(ratios):.3f}x over {a.rounds} "
        "alternated rounds (crc32 of every byte as DCP writes it, then rank 0's merge)",
        f"checking on resume: crc32 of every file read back in {verify_s:.2f} s "
        f"({gb / verify_s:.1f} GB/s from the page cache; a cold disk reads slower)",
        f"dataset fingerprint of the bundled Shakespeare (3.1 MB): {fingerprint_ms:.1f} ms "
        "(32 regions of 4 KiB per token file, whatever its size)",
    ]
    config = {"preset": a.preset, "bytes": n_bytes, "rounds": a.rounds}
    cols = columns("round:round:d; plain_s:FileSystemWriter s:.2f; checksum_s:ChecksumWriter s:.2f")
    cols += columns("ratio:ratio:.3f")
    summary = {
        "median_ratio": median(ratios),
        "verify_s": verify_s,
        "fingerprint_ms": fingerprint_ms,
    }
    write_results(
        "bench_checksums",
        "Content checksums: cost of writing and checking",
        machine(),
        config | summary,
        rows,
        table(rows, cols),
        notes,
    )


if __name__ == "__main__":
    main()
