"""Gradient compression pieces that need no process group: who reduces what (the plan), the
float16 scaling, PowerSGD's bookkeeping, bucketing, and the configuration errors raised
before any collective. The compressed reductions themselves are tested against fp32 in real
launches: tests/distributed/test_compression.py."""

from __future__ import annotations

import pytest
import torch

from gpt3d.config import ParallelConfig, load_config
from gpt3d.errors import ConfigError
from gpt3d.parallel.compression import (
    GradSync,
    ReductionPlan,
    buckets,
    fp16_scale,
    own_ddp_all_reduce,
    plan_reduction,
)
from gpt3d.parallel.dims import ParallelDims
from gpt3d.parallel.powersgd import PowerSGD
from gpt3d.preflight import preflight
from tests.helpers import SMALL_MODEL, make_dataset

DDP = ParallelDims(dp_replicate=2)
FSDP = ParallelDims(dp_shard=2)
HSDP = ParallelDims(dp_replicate=2, dp_shard=2)


def plan(dims, **parallel):
    mode = "ddp" if dims.dp_shard == 1 and dims.dp_replicate > 1 else "fsdp"
    return plan_reduction(ParallelConfig(dp_mode=mode, **parallel), dims)


# ---- who reduces what -----------------------------------------------------------------


@pytest.mark.parametrize("dims", [DDP, FSDP, HSDP, ParallelDims()])
def test_float32_default_leaves_the_reduction_to_fsdp(dims):
    """The default keeps the parity-tested path: FSDP2/replicate, no GradSync, fp32."""
    p = plan(dims)
    assert p.sync_dtype is None and p.powersgd_rank == 0 and p.fsdp_dtype == "float32"
    expected = {DDP: ("dp_replicate",), FSDP: ("dp_shard",), HSDP: ("dp_replicate", "dp_shard")}
    assert p.fsdp_axes == expected.get(dims, ())


def test_bfloat16_everywhere_stays_native_and_overlapped():
    for dims in (DDP, FSDP, HSDP):
        p = plan(dims, grad_reduce_dtype="bfloat16")
        assert p.sync_dtype is None and p.fsdp_dtype == "bfloat16"


def test_ddp_on_cpu_with_fp32_compute_is_gpt3ds_own_all_reduce_once_a_step():
    """No wrapper (fsdp_axes empty), GradSync in the plan's dtype; FSDP2's replicate stays on
    GPUs (it overlaps there), with bf16 compute (its mixed precision) and wherever it shards."""
    for dtype in ("float32", "bfloat16"):
        p = own_ddp_all_reduce(plan(DDP, grad_reduce_dtype=dtype), DDP, "cpu", None)
        assert p == ReductionPlan((), "float32", dtype)
    kept = [
        (plan(DDP), DDP, "cuda", None),
        (plan(DDP), DDP, "cpu", torch.bfloat16),
        (plan(HSDP), HSDP, "cpu", None),
        (plan(FSDP), FSDP, "cpu", None),
        (plan(DDP, grad_reduce_dtype="float16"), DDP, "cpu", None),  # already GradSync's
    ]
    for reduction, dims, device, param_dtype in kept:
        assert own_ddp_all_reduce(reduction, dims, device, param_dtype) == reduction


@pytest.mark.parametrize(
    "dims, overrides, fsdp_dtype, sync_dtype",
    [
        # FSDP2's all-reduce cannot scale float16, nor send a dtype of its own over one axis
        (DDP, {"grad_reduce_dtype": "float16"}, "float32", "float16"),
        (HSDP, {"grad_reduce_dtype": "float16"}, "float16", "float16"),
        (HSDP, {"grad_reduce_dtype_replicate": "bfloat16"}, "float32", "bfloat16"),
        (HSDP, {"grad_compression": "powersgd"}, "float32", "float32"),
        (
            DDP,
            {"grad_compression": "powersgd", "grad_reduce_dtype": "bfloat16"},
            "float32",
            "bfloat16",
        ),
    ],
)
def test_compressed_replicate_axis_goes_to_grad_sync(dims, overrides, fsdp_dtype, sync_dtype):
    p = plan(dims, **overrides)
    assert p.fsdp_axes == ("dp_shard",)  # FSDP2 over dp_shard only (size 1 in ddp mode)
    assert (p.fsdp_dtype, p.sync_dtype) == (fsdp_dtype, sync_dtype)


def test_float16_on_fsdp_uses_the_scaled_reduce_scatter():
    p = plan(FSDP, grad_reduce_dtype="float16")
    assert p.scaled_fp16 and p.sync_dtype is None


# ---- float16 scaling -------------------------------------------------------------------


@pytest.mark.parametrize("amax", [3e-9, 1e-5, 0.02, 7.0, 4e4])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_fp16_scale_keeps_the_sum_in_range(amax, n):
    scale = fp16_scale(torch.tensor(amax), n)
    assert torch.log2(scale) == torch.round(torch.log2(scale))  # a power of two: exact
    assert 2.0**14 < n * amax * scale.item() <= 2.0**15  # no overflow, top of the range used


def test_fp16_scale_of_zero_and_non_finite_gradients():
    assert fp16_scale(torch.tensor(0.0), 4) == 1.0
    for bad in (float("nan"), float("inf")):  # the trainer's finiteness check must see it
        g = torch.tensor([1e-6, bad])
        scale = fp16_scale(g.abs().max(), 2)
        assert not ((g * scale).half().float() / scale).isfinite().all()


def test_scaling_saves_small_gradients_from_float16_underflow():
    """gpt3d's gradients (loss / global tokens) are ~1e-4 and below: a plain cast flushes or
    coarsens them; the scaled cast keeps float16's relative precision (2^-11)."""
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(10_000, generator=g) * 10 ** torch.empty(10_000).uniform_(
        -9, -4, generator=g
    )
    plain = grads.half().float()
    scale = fp16_scale(grads.abs().max(), 2)
    scaled = (grads * scale).half().float() / scale
    rel = lambda x: ((x - grads).abs() / grads.abs()).max().item()  # noqa: E731
    assert rel(plain) > 0.5 and (plain == 0).sum() > 1000
    assert rel(scaled) <= 2.0**-11


# ---- PowerSGD bookkeeping, buckets -----------------------------------------------------


def test_powersgd_compresses_only_matrices_that_gain():
    psgd = PowerSGD(rank=4, seed=0)
    assert not psgd.compressible(torch.zeros(512))  # biases, LayerNorms
    assert not psgd.compressible(torch.zeros(8, 8))  # 4 * (8 + 8) * 2 > 64
    assert not psgd.compressible(torch.zeros(0, 64))  # an empty FSDP shard
    assert psgd.compressible(torch.zeros(64, 256))
    assert psgd.compressible(torch.zeros(16, 4, 64))  # viewed as (16, 256)


def test_powersgd_start_state_is_shared_by_name():
    """Every rank must start from the same Q (P sums M_k @ Q): it depends on seed and name."""
    a, b = PowerSGD(2, seed=5), PowerSGD(2, seed=5)
    named = [("h.0.mlp.c_fc.weight", torch.zeros(256, 64)), ("wte.weight", torch.zeros(512, 64))]
    a.init_state(named)
    b.init_state(list(reversed(named)))
    for name, _ in named:
        assert torch.equal(a.q[name], b.q[name]) and a.q[name].shape == (64, 2)
        assert torch.count_nonzero(a.error[name]) == 0
    assert not torch.equal(a.q["wte.weight"], a.q["h.0.mlp.c_fc.weight"])
    assert set(a.state_dict()) == {f"{n}.{k}" for n, _ in named for k in ("q", "error")}


def test_grad_sync_gives_a_missing_gradient_zeros():
    """Every rank must join the same all-reduces: a parameter without a gradient on this rank
    (a peer may have one) takes part with zeros; a tied parameter appears once."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[0](torch.ones(2, 4)).sum().backward()  # model[1].bias gets no gradient
    plan = ReductionPlan(("dp_shard",), "float32", "float32")
    named = GradSync([model], None, plan, seed=0, layout="test").named_local(grads=True)
    assert [n for n, _ in named] == ["0.weight", "0.bias", "1.bias"]
    assert torch.count_nonzero(model[1].bias.grad) == 0


def test_buckets_keep_order_and_cap():
    ts = [torch.zeros(n) for n in (10, 30, 5, 100, 1, 1)]
    groups = buckets(ts, cap=4 * 40)
    assert [t for g in groups for t in g] == ts
    assert [[t.numel() for t in g] for g in groups] == [[10, 30], [5], [100], [1, 1]]


# ---- configuration errors, before any collective ----------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


FSDP_MODE = "--parallel.dp_mode=fsdp"  # explicit: auto picks ddp for models this small
REFUSED = {
    "powersgd on FSDP": (2, [FSDP_MODE, "--parallel.grad_compression=powersgd"], "dp_replicate=1"),
    "powersgd, fsdp over dp_replicate": (
        2,
        [
            FSDP_MODE,
            "--parallel.grad_compression=powersgd",
            "--parallel.dp_replicate=2",
            "--parallel.dp_shard=1",
        ],
        "FSDP shards over dp_replicate",
    ),
    "powersgd, 1 process": (1, ["--parallel.grad_compression=powersgd"], "dp_mode=ddp"),
    "replicate dtype without the axis": (
        2,
        [FSDP_MODE, "--parallel.grad_reduce_dtype_replicate=bfloat16"],
        "grad_reduce_dtype_replicate=bfloat16",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_combinations_are_refused(data, case):
    world, args, match = REFUSED[case]
    with pytest.raises(ConfigError, match=match) as info:
        preflight(load_config([*SMALL_MODEL, f"--data.dataset={data}", *args]), world)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "world, args",
    [
        (2, ["--parallel.dp_mode=ddp", "--parallel.grad_compression=powersgd"]),
        (4, ["--parallel.dp_replicate=2", "--parallel.grad_compression=powersgd"]),
        (4, ["--parallel.dp_replicate=2", "--parallel.grad_reduce_dtype_replicate=float16"]),
        (2, [FSDP_MODE, "--parallel.grad_reduce_dtype=float16"]),
        (1, ["--parallel.grad_reduce_dtype=bfloat16"]),  # nothing to reduce: accepted
    ],
)
def test_supported_combinations_pass(data, world, args):
    preflight(load_config([*SMALL_MODEL, f"--data.dataset={data}", *args]), world)


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="grad_reduce_dtype"):
        load_config(["--parallel.grad_reduce_dtype=float8"])
    with pytest.raises(ConfigError, match="grad_compression"):
        load_config(["--parallel.grad_compression=topk"])
    with pytest.raises(ConfigError, match="powersgd_rank"):
        load_config(["--parallel.powersgd_rank=0"])
