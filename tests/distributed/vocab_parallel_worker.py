"""tp = world size: a token embedding split by rows with a plan's "rowwise" style (gpt3d's
VocabParallelEmbedding) against the same table whole in this process, for replicated and
sequence-split outputs and a vocabulary whose last rank holds padding rows. Writes
<out>/rank<r>.json with the largest differences and the gradient's placement.

Usage: torchrun --nproc_per_node=N vocab_parallel_worker.py <out_dir>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.parallel import parallelize_module  # noqa: E402

from gpt3d.parallel.tensor_parallel import Rule, build_style  # noqa: E402
from gpt3d.parallel.utils import clean_exit  # noqa: E402

VOCAB, ROWS, C, B, T = 50, 64, 8, 3, 8  # 50 real tokens in a table padded to 64 rows


def case(mesh, output: str) -> dict:
    torch.manual_seed(0)
    whole = nn.Embedding(ROWS, C)
    ids = torch.randint(0, VOCAB, (B, T))
    upstream = torch.randn(B, T, C)  # the gradient arriving from above
    (whole(ids) * upstream).sum().backward()

    split = nn.Embedding(ROWS, C)
    split.weight.data.copy_(whole.weight.data)
    rule = Rule("wte", "rowwise", {"input_layouts": "replicate", "output_layouts": output})
    parallelize_module(split, mesh, build_style(rule, embedding=True))
    out = split(ids)
    rank, tp = dist.get_rank(), dist.get_world_size()
    expect, up = whole(ids).detach(), upstream
    if output == "shard(1)":  # this rank's sequence slice
        expect, up = expect.chunk(tp, dim=1)[rank], upstream.chunk(tp, dim=1)[rank]
    (out * up).sum().backward()
    grad = split.weight.grad
    rows = whole.weight.grad.chunk(tp, dim=0)[rank]
    return {
        "plain_output": type(out) is torch.Tensor,
        "contiguous": out.is_contiguous(),  # a pipeline stage sends it as it is
        "out_diff": (out - expect).abs().max().item(),
        "grad_placements": [str(p) for p in grad.placements],
        "grad_diff": (grad.to_local() - rows).abs().max().item(),
        "grad_rows": grad.to_local().shape[0],
    }


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    record = {out: case(mesh, out) for out in ("replicate", "shard(1)")}
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    clean_exit(0)  # barrier, destroy, os._exit: no gloo SIGABRT at interpreter exit


if __name__ == "__main__":
    main()
