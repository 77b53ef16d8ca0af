"""gpt3d's vocab-parallel embedding (a plan's "rowwise" on nn.Embedding) gives the embeddings
and the row gradients of the whole table in one process, and its gradient is this rank's rows
(Shard(0)) computed on those rows only; torch's RowwiseParallel returns a Replicate gradient
of the whole table here (torch 2.13), which the placement check rejects."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_script

pytestmark = [pytest.mark.distributed]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_embedding_matches_the_whole_table(tmp_path, tp):
    proc = run_script("tests/distributed/vocab_parallel_worker.py", [tmp_path], nproc=tp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert len(ranks) == tp
    for rank in ranks:
        for output, r in rank.items():
            assert r["plain_output"], output  # use_local_output: a plain tensor leaves
            assert r["contiguous"], output
            assert r["out_diff"] == 0.0, (output, r)  # one rank's row plus zeros: exact
            assert r["grad_diff"] <= 1e-6, (output, r)
            assert r["grad_placements"] == ["S(0)"], (output, r)
            assert r["grad_rows"] == 64 // tp
