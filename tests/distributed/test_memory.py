"""Start-up never holds a full model per rank, in resident memory: GPT-2 124M over 4 FSDP
ranks must build and initialise with each rank's resident set growing by about its parameter
shard, not by the whole model (the old per-parameter full-tensor init grew each rank by
2.8x its shard: 333 MiB for a 119 MiB shard; blockwise init: 161 MiB)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
MiB = 2**20


@pytest.mark.timeout(300)
def test_fsdp_startup_resident_memory_is_about_the_shard(tmp_path):
    args = [
        tmp_path / "out",
        "--model.preset=gpt2",
        "--model.pad_vocab_multiple=64",
        "--data.dataset=recipes/data/shakespeare",
        "--training.seq_len=64",
        "--training.global_batch_size=8",
    ]
    proc = run_script("tests/distributed/memory_worker.py", args, nproc=4, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted((tmp_path / "out").glob("rank*.json"))]
    assert len(ranks) == 4
    for r in ranks:
        grown = (r["startup_peak_gib"] - r["baseline_gib"]) * 2**30
        shard, whole = r["param_bytes"], r["full_param_bytes"]
        assert shard * 3.9 < whole  # FSDP over 4: each rank holds a quarter
        print(f"start-up RSS +{grown / MiB:.0f} MiB for a {shard / MiB:.0f} MiB shard")
        assert grown <= 1.25 * shard + 48 * MiB, (grown / MiB, shard / MiB)
