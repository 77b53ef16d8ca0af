"""What is planned (Workload), one candidate (Layout), the search space, and the command
that runs a layout.

Validity is gpt3d's own: every candidate goes through `gpt3d_layout_error`, the one place
that calls gpt3d's layout checks. The planner adds only its stated rules (PLANNER_RULES).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gpt3d.model import GPTConfig, preset_config
from gpt3d.parallel.dims import PP_SCHEDULES as SCHEDULES
from gpt3d.parallel.dims import SINGLE_STAGE_SCHEDULES, V_SCHEDULES

AC_MODES = ("none", "selective", "full")
PLANNER_RULES = (
    "tp divides the GPUs per node (tensor parallelism stays inside a node: it communicates "
    "every layer)",
    "pipeline microbatches: at least pp, and they divide the per-dp batch; with pp = 1 "
    "grad_accum divides it instead",
    "data parallel is FSDP on dp_shard, HSDP on dp_replicate x dp_shard, or DDP on "
    "dp_replicate (dp_mode=ddp)",
    "virtual stages per rank: 2..max_stages_per_rank for the looped schedules, exactly 2 for "
    "the V schedules",
)


@dataclass(frozen=True)
class Workload:
    """The model, the batch and the precision to plan for."""

    model: GPTConfig
    seq_len: int
    global_batch: int  # sequences per optimizer step
    dtype: str = "bfloat16"
    model_args: tuple[str, ...] = ()  # --model.* overrides that rebuild `model` in train.py
    ac_every: int = 2  # selective activation checkpointing: every k-th block
    device: str = "cuda"  # where the step runs: "cuda" or "cpu" (gpt3d.loss chunks differ)

    @classmethod
    def from_preset(
        cls,
        preset: str,
        seq_len: int,
        global_batch: int,
        dtype: str = "bfloat16",
        pad_vocab_multiple: int = 64,
        device: str = "cuda",
        **shape,
    ) -> Workload:
        model = preset_config(preset, pad_vocab_multiple=pad_vocab_multiple, **shape)
        args = [f"--model.preset={preset}", f"--model.pad_vocab_multiple={pad_vocab_multiple}"]
        args += [f"--model.{k}={v}" for k, v in shape.items() if v is not None]
        return cls(model, seq_len, global_batch, dtype, tuple(args), device=device)

    @property
    def tokens(self) -> int:
        return self.global_batch * self.seq_len


@dataclass(frozen=True)
class Layout:
    """One way to run the workload: mesh degrees and how each axis is used."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    dp_mode: str = "fsdp"
    schedule: str = "1F1B"  # only meaningful with pp > 1
    stages_per_rank: int = 1
    microbatches: int = 1  # pipeline microbatches per step (1 when pp = 1)
    grad_accum: int = 1
    ac: str = "none"
    sequence_parallel: bool = False
    ep: int = 1  # expert parallel (MoE): borrowed from dp_shard, not a factor of the world
    embedding: str = "auto"  # parallel.embedding_sharding: auto, fsdp or vocab
    reshard_per_microbatch: bool = False  # parallel.fsdp_reshard_per_microbatch (FSDP + pp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def n_microbatches(self) -> int:
        """Forward/backward passes per rank per optimizer step."""
        return self.microbatches * self.grad_accum

    def microbatch_size(self, global_batch: int) -> int:
        return global_batch // (self.dp * self.n_microbatches)

    @property
    def dp_kind(self) -> str:
        if self.dp == 1:
            return "-"
        if self.dp_mode == "ddp":
            return "DDP"
        return "HSDP" if self.dp_replicate > 1 else "FSDP"

    def schedule_name(self) -> str:
        if self.pp == 1:
            return "-"
        return self.schedule + (f"/v{self.stages_per_rank}" if self.stages_per_rank > 1 else "")

    def table_by_rows(self, w: Workload) -> bool:
        """Whether the embedding table stays sharded by vocabulary rows over dp_shard (× tp)
        (gpt3d.parallel.vocab_over_dp), as parallel.embedding_sharding resolves on this
        layout (gpt3d.preflight.choose_embedding_sharding)."""
        from gpt3d.parallel.vocab_over_dp import table_by_rows

        tokens = self.microbatch_size(w.global_batch) * w.seq_len
        vocab = w.model.padded_vocab_size
        # gpt3d's shipped plans (the planner's tp) hold the table as the rows can replace
        return table_by_rows(self.embedding, self, self.dp_mode, tokens, vocab, w.seq_len)

    @property
    def fsdp_whole_stage(self) -> bool:
        """FSDP under pp keeping the stage unsharded for the step (torch's schedules)."""
        fsdp = self.dp > 1 and self.dp_mode == "fsdp"
        return fsdp and self.pp > 1 and not self.reshard_per_microbatch

    @property
    def efsdp(self) -> int:
        """FSDP degree of the experts (what dp_shard leaves after ep)."""
        return self.dp_shard // self.ep


def ddp_wrapper(w: Workload, lay: Layout) -> bool:
    """Whether DDP runs as FSDP2's replicate (per-block hooks), not gpt3d's own all-reduce
    once a step: everywhere but fp32 on CPU (gpt3d.parallel.compression.own_ddp_all_reduce)."""
    ddp = lay.dp > 1 and lay.dp_mode == "ddp" and lay.dp_shard == 1
    return ddp and not (w.device == "cpu" and w.dtype == "float32")


def gpt3d_layout_error(w: Workload, lay: Layout) -> str | None:
    """gpt3d's own verdict on a layout: None if recipes/train.py would accept it, else its
    message. The only place the planner calls gpt3d's validation (repoint it here)."""
    from gpt3d.parallel.dims import resolve_dims
    from gpt3d.preflight import check_layout

    parallel, training = parallel_config(lay), training_config(w, lay)
    try:
        dims = resolve_dims(parallel, lay.world)
        check_layout(dims, w.model, training, parallel)
    except ValueError as e:  # gpt3d's UserError / ConfigError
        return str(e)
    return None


def parallel_config(lay: Layout):
    from gpt3d.config import ParallelConfig

    return ParallelConfig(
        dp_replicate=lay.dp_replicate,
        dp_shard=lay.dp_shard,
        pp=lay.pp,
        tp=lay.tp,
        pp_schedule=lay.schedule,
        pp_microbatches=lay.microbatches if lay.pp > 1 else 0,
        pp_stages_per_rank=lay.stages_per_rank,
        sequence_parallel=lay.sequence_parallel,
        dp_mode=lay.dp_mode,
        ep=lay.ep,
        embedding_sharding=lay.embedding,
        fsdp_reshard_per_microbatch=lay.reshard_per_microbatch,
    )


def training_config(w: Workload, lay: Layout):
    from gpt3d.config import TrainingConfig

    return TrainingConfig(
        global_batch_size=w.global_batch,
        seq_len=w.seq_len,
        grad_accum=lay.grad_accum,
        dtype=w.dtype,
        activation_checkpointing=lay.ac,
        ac_every=w.ac_every,
    )


# ------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    schedules: tuple[str, ...] = SCHEDULES
    ac_modes: tuple[str, ...] = AC_MODES
    dp_modes: tuple[str, ...] = ("fsdp", "hsdp", "ddp")
    sequence_parallel: tuple[bool, ...] = (False, True)
    max_stages_per_rank: int = 4


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def factorizations(world: int, per_node: int) -> Iterator[tuple[int, int, int]]:
    """(pp, dp, tp) with pp * dp * tp = world and tp dividing the GPUs per node."""
    for tp in divisors(world):
        if tp > per_node or per_node % tp:
            continue
        for pp in divisors(world // tp):
            yield pp, world // (tp * pp), tp


def dp_splits(dp: int, modes: tuple[str, ...]) -> Iterator[tuple[int, int, str]]:
    """(dp_replicate, dp_shard, dp_mode) for a data-parallel degree."""
    if dp == 1:
        yield 1, 1, "fsdp"
        return
    if "fsdp" in modes:
        yield 1, dp, "fsdp"
    if "hsdp" in modes:
        yield from ((r, dp // r, "fsdp") for r in divisors(dp) if 1 < r < dp)
    if "ddp" in modes:
        yield dp, 1, "ddp"


def pipeline_options(pp: int, per_dp_batch: int, n_layer: int, space: SearchSpace):
    """(schedule, stages per rank, microbatches, grad_accum) for a pipeline degree."""
    if pp == 1:
        for ga in divisors(per_dp_batch):
            yield "1F1B", 1, 1, ga
        return
    for name in space.schedules:
        if name in SINGLE_STAGE_SCHEDULES:
            vs = [1]
        elif name in V_SCHEDULES:
            vs = [2]
        else:
            vs = range(2, space.max_stages_per_rank + 1)
        for v in vs:
            if pp * v > n_layer:
                continue
            for m in divisors(per_dp_batch):
                if m >= pp:
                    yield name, v, m, 1


def enumerate_layouts(w: Workload, world: int, per_node: int, space: SearchSpace):
    """Every candidate layout (not yet validated by gpt3d)."""
    for pp, dp, tp in factorizations(world, per_node):
        if w.global_batch % dp:
            continue
        for rep, shard, mode in dp_splits(dp, space.dp_modes):
            sps = space.sequence_parallel if tp > 1 else (False,)
            for name, v, m, ga in pipeline_options(
                pp, w.global_batch // dp, w.model.n_layer, space
            ):
                for ac in space.ac_modes:
                    for sp in sps:
                        for ep in expert_degrees(w, shard, mode):
                            yield Layout(pp, rep, shard, tp, mode, name, v, m, ga, ac, sp, ep)


def expert_degrees(w: Workload, dp_shard: int, mode: str) -> list[int]:
    """ep for a MoE model: divisors of dp_shard that divide the experts (FSDP only)."""
    E = w.model.n_experts
    if not E or mode != "fsdp":
        return [1]
    return [e for e in divisors(dp_shard) if E % e == 0]


# ------------------------------------------------------------------------------ command


TRAINING_KEYS = ("global_batch_size", "seq_len", "grad_accum", "dtype",
                 "activation_checkpointing", "ac_every")  # fmt: skip
PARALLEL_KEYS = ("dp_replicate", "dp_shard", "pp", "tp", "ep", "dp_mode", "pp_schedule",
                 "pp_microbatches", "pp_stages_per_rank", "sequence_parallel",
                 "embedding_sharding", "fsdp_reshard_per_microbatch")  # fmt: skip


def train_args(w: Workload, lay: Layout) -> list[str]:
    """recipes/train.py overrides that run this layout. Every layout field is set, so the
    default config's own [parallel] values never leak in (an empty pp_layer_split = even)."""
    sections = (("training", training_config(w, lay), TRAINING_KEYS),
                ("parallel", parallel_config(lay), PARALLEL_KEYS))  # fmt: skip
    args = list(w.model_args)
    for section, values, keys in sections:
        for key in keys:
            value = getattr(values, key)
            value = str(value).lower() if isinstance(value, bool) else value
            args.append(f"--{section}.{key}={value}")
    return args + ["--parallel.pp_layer_split="]


def layout_args(w: Workload, lay: Layout) -> list[str]:
    """The overrides that choose this layout (train_args without the model and batch)."""
    keys = ["dp_replicate", "dp_shard", "pp", "tp", "dp_mode"]
    keys += ["pp_schedule", "pp_microbatches", "pp_stages_per_rank"] if lay.pp > 1 else []
    keys += ["sequence_parallel"] if lay.tp > 1 else []
    keys += ["ep"] if lay.ep > 1 else []
    keys += ["embedding_sharding"] if lay.embedding != "auto" else []
    keys += ["fsdp_reshard_per_microbatch"] if lay.reshard_per_microbatch else []
    values = parallel_config(lay)
    args = [f"--parallel.{k}={_arg(getattr(values, k))}" for k in keys]
    args += [f"--training.grad_accum={lay.grad_accum}"] if lay.grad_accum > 1 else []
    args += [f"--training.activation_checkpointing={lay.ac}"] if lay.ac != "none" else []
    return args


def _arg(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def torchrun_command(w: Workload, lay: Layout, per_node: int) -> str:
    nodes = -(-lay.world // per_node)
    nproc = min(per_node, lay.world)
    if nodes == 1:
        launch = f"torchrun --standalone --nproc_per_node={nproc}"
    else:
        launch = (
            f"torchrun --nnodes={nodes} --nproc_per_node={nproc} --rdzv-backend=c10d "
            "--rdzv-endpoint=$MASTER_ADDR:29500"
        )
    return f"{launch} recipes/train.py " + " ".join(train_args(w, lay))
