"""Everything checked before the first collective, in one place, ending in one frozen RunPlan:

    run = preflight(load_config(argv), world_size, rank)   # no process group needed

In order: values that relate config fields; the pretrained model's shape (checkpoint.init_from,
read from its config.json only); the model shape; the layout against the world size, the
model and the batch; the tensor-parallel plan file; the dataset; the checkpoint to resume
from. Every rule is stated here once and raises a gpt3d.errors.UserError whose one line names
the problem and the fix; gpt3d/launch.py prints it once (rank 0) and exits with code 2.

Rules: "resume wins over init_from" (a restarted fine-tune continues from its own
checkpoint); a resumed run keeps the data order (seed, seq_len) and the dataset of the
checkpoint (checkpoint.allow_dataset_change lifts the latter), its files must have the
checksums they were written with (rank 0 reads them all; checkpoint.verify_checksums=false
skips it), and the disk must have room for one more checkpoint of its size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from gpt3d.checkpoint_dir import checkpoint_root, find_resume, verify
from gpt3d.config import Config, gpt_config
from gpt3d.data import validate_dataset
from gpt3d.errors import CheckpointError, ConfigError, DataError, missing_extra
from gpt3d.model import GPTConfig, count_params_formula, describe
from gpt3d.parallel.dims import (
    SINGLE_STAGE_SCHEDULES,
    SPLIT_BACKWARD_SCHEDULES,
    V_SCHEDULES,
    ParallelDims,
    n_microbatches,
    resolve_dims,
)


@dataclass(frozen=True)
class RunPlan:
    """A run that passed every check: what each rank builds, from what, on which layout."""

    config: Config  # as given, with a pretrained model's shape filled into [model]
    model: GPTConfig
    dims: ParallelDims
    tp_rules: tuple  # the validated tensor-parallel plan (gpt3d.parallel.tensor_parallel.Rule)
    dataset: dict  # the dataset's meta.json
    resume: Path | None  # a verified checkpoint to continue from
    pretrained: object | None  # gpt3d.hf.LazyHFWeights to start from (never when resuming)
    ep_rules: tuple = ()  # the plan's [experts] rules (gpt3d.parallel.expert_parallel)
    dp_choice: str = ""  # why parallel.dp_mode is what it is
    embedding_choice: str = ""  # why parallel.embedding_sharding is what it is

    def describe(self) -> str:
        start = (
            f"resume {self.resume}"
            if self.resume
            else f"init from {self.config.checkpoint.init_from}"
            if self.pretrained
            else f"fresh init (seed {self.config.job.seed})"
        )
        dp = f"; data parallel: {self.dp_choice}" if self.dims.dp > 1 else ""
        if self.embedding_choice:
            dp += f"; embedding table: {self.embedding_choice}"
        return f"layout {self.dims.describe()}{dp}; model {describe(self.model)}; {start}"


def preflight(cfg: Config, world_size: int, rank: int = 0) -> RunPlan:
    """Check the whole run without starting a process group. `rank` 0 also scans the token
    files for out-of-range ids (once is enough: every rank reads the same files)."""
    cfg = copy.deepcopy(cfg)
    check_values(cfg)
    pretrained_path = cfg.checkpoint.init_from
    if pretrained_path:
        _take_pretrained_shape(cfg, pretrained_path)
    model = gpt_config(cfg.model)
    check_model(model, cfg)
    dp_choice = choose_dp_mode(cfg, model, world_size)  # parallel.dp_mode "auto" -> fsdp/ddp
    dims = resolve_dims(cfg.parallel, world_size)
    check_layout(dims, model, cfg.training, cfg.parallel)
    check_outputs(cfg, world_size)
    rules = _plan_rules(model, cfg, dims) if dims.tp > 1 or dims.ep > 1 else ()
    tp_rules = tuple(r for r in rules if r.section == "modules") if dims.tp > 1 else ()
    embedding_choice = choose_embedding_sharding(cfg, model, dims, tp_rules)
    ep_rules = tuple(r for r in rules if r.section == "experts")
    dataset = validate_dataset(
        cfg.data.dataset, model.vocab_size, cfg.training.seq_len, check_ids=rank == 0
    )
    resume = _verified_resume(cfg, model, rank)
    pretrained = None
    if pretrained_path and resume is None:
        from gpt3d.hf import LazyHFWeights

        pretrained = LazyHFWeights(pretrained_path, model)  # checks every tensor's shape
    return RunPlan(
        cfg, model, dims, tp_rules, dataset, resume, pretrained, ep_rules, dp_choice,
        embedding_choice,
    )  # fmt: skip


AUTO_DDP_FRACTION = 0.25  # replicate when the model state takes at most this of a rank's memory


def choose_dp_mode(cfg: Config, model: GPTConfig, world_size: int) -> str:
    """parallel.dp_mode "auto": DDP when the unsharded model state (fp32 params + grads +
    AdamW, 16 bytes per parameter, divided by tp and pp) fits comfortably in a rank's
    memory, so FSDP's per-step gathers and reduce-scatters would buy nothing; FSDP otherwise
    and whenever sharding is asked for (dp_shard > 1, HSDP, expert parallelism). Sets the
    concrete mode in cfg and returns why (logged)."""
    p = cfg.parallel
    if p.dp_mode != "auto":
        return f"{p.dp_mode} (parallel.dp_mode)"
    if p.dp_shard > 1 or getattr(p, "ep", 1) > 1:
        p.dp_mode = "fsdp"
        return "fsdp (parallel.dp_shard / ep ask for sharding)"
    fits, why = state_fits_comfortably(cfg, model, world_size)
    p.dp_mode = "ddp" if fits else "fsdp"
    return f"{p.dp_mode} (auto: {why}{'' if fits else ': shard it'})"


def choose_embedding_sharding(
    cfg: Config, model: GPTConfig, dims: ParallelDims, tp_rules: tuple = ()
) -> str:
    """parallel.embedding_sharding: "vocab" where the layout allows it (asked for: checked)
    and, for "auto", where the gathered tokens of a microbatch are at most half the padded
    vocabulary's rows per tp rank (gpt3d.parallel.vocab_over_dp.table_by_rows); "fsdp"
    otherwise. tp_rules: the tensor-parallel plan, whose wte / lm_head rules the rows must
    be able to stand in for. Sets the concrete value in cfg and returns why ('' when there
    is no FSDP root to speak of)."""
    from gpt3d.parallel import vocab_over_dp as rows_lib

    p, t = cfg.parallel, cfg.training
    plan_why_not = rows_lib.table_rules_why_not(tp_rules, p.loss_parallel) if dims.tp > 1 else ""
    asked = p.embedding_sharding
    why_not = rows_lib.why_not_vocab_rows(dims, p.dp_mode, t.seq_len, plan_why_not)
    if asked == "vocab":
        _require(not why_not, f"parallel.embedding_sharding=vocab: {why_not}")
    microbatches = t.grad_accum * (n_microbatches(p) if dims.pp > 1 else 1)
    tokens = t.global_batch_size // (dims.dp * microbatches) * t.seq_len
    vocab = model.padded_vocab_size
    rows = rows_lib.table_by_rows(asked, dims, p.dp_mode, tokens, vocab, t.seq_len, plan_why_not)
    p.embedding_sharding = "vocab" if rows else "fsdp"
    if p.dp_mode != "fsdp" or dims.dp == 1:
        return ""
    where = rows_lib.rows_what(dims.tp) if rows else "in FSDP's root group"
    if asked != "auto":
        return f"{where} (parallel.embedding_sharding)"
    if why_not:
        return f"{where} (auto: {rows_lib.rows_what(dims.tp)} {why_not})"
    half = "at most" if rows else "over"
    table = f"the {vocab}-row vocabulary"
    if dims.tp > 1:
        table += f"'s {vocab // dims.tp} rows per tp rank"
    gathered = f"{dims.dp_shard * tokens} gathered tokens per microbatch"
    return f"{where} (auto: {gathered}, {half} half {table})"


def state_fits_comfortably(cfg: Config, model: GPTConfig, world_size: int) -> tuple[bool, str]:
    """Whether the unsharded model state per rank (16 bytes per parameter / (tp * pp)) is
    within AUTO_DDP_FRACTION of a rank's memory, and that sentence."""
    p = cfg.parallel
    state = 16 * count_params_formula(model) / (p.tp * p.pp)
    per_rank = _memory_per_rank(world_size)
    fits = state <= AUTO_DDP_FRACTION * per_rank
    return fits, (
        f"the unsharded model state, {state / 2**30:.2f} GiB per rank, is "
        f"{'within' if fits else 'over'} {AUTO_DDP_FRACTION:.0%} of the "
        f"{per_rank / 2**30:.1f} GiB a rank has"
    )


def _memory_per_rank(world_size: int) -> float:
    """Bytes of memory one rank can use: its GPU, or this host's RAM split over its ranks."""
    import os

    import torch

    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(local).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---------------------------------------------------------------------------- config values


def check_values(cfg: Config) -> None:
    """Rules between config fields (each field's own bounds are declared in config.py)."""
    t, p = cfg.training, cfg.parallel
    _require(
        t.min_lr <= t.lr,
        f"training.min_lr={t.min_lr} must be <= training.lr={t.lr}; lower training.min_lr",
    )
    _require(
        t.eval_interval == 0 or t.eval_steps >= 1,
        f"training.eval_steps={t.eval_steps} must be >= 1 while eval_interval > 0; "
        "raise it, or set --training.eval_interval=0 to disable evaluation",
    )
    _require(
        p.dp_shard == -1 or p.dp_shard >= 1,
        f"parallel.dp_shard={p.dp_shard} must be >= 1, or -1 for the rest of the world size",
    )


def check_outputs(cfg: Config, world_size: int) -> None:
    """[profiling] ranks exist; optional packages the outputs need are installed."""
    bad = [r for r in cfg.profiling.ranks if not 0 <= r < world_size]
    _require(
        not bad,
        f"profiling.ranks={cfg.profiling.ranks}: rank(s) {bad} outside the world of "
        f"{world_size}; use ranks in [0, {world_size}) or [] for every rank",
    )
    for setting, package, on in (
        ("metrics.wandb", "wandb", cfg.metrics.wandb),
        ("metrics.tensorboard", "tensorboard", cfg.metrics.tensorboard),
    ):
        if on and not _installed(package):
            raise missing_extra(setting, package, package)


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: its import is blocked
        return False


# ---------------------------------------------------------------------------- model shape

_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def _take_pretrained_shape(cfg: Config, path: str) -> None:
    """checkpoint.init_from: the shape comes from the pretrained config.json; an explicit
    [model] setting that contradicts it is an error."""
    from gpt3d.hf import hf_config

    m = cfg.model
    hf = hf_config(path, n_head=m.n_head or None, pad_vocab_multiple=m.pad_vocab_multiple)
    bad = [
        f"model.{k}={getattr(m, k)} (pretrained: {getattr(hf, k)})"
        for k in _SHAPE_KEYS
        if getattr(m, k) and getattr(m, k) != getattr(hf, k)
    ]
    if not m.tie_embeddings and hf.tie_embeddings:  # true is the default: only false conflicts
        bad.append("model.tie_embeddings=false (pretrained: tied)")
    if not m.bias:
        bad.append("model.bias=false (GPT-2 has biases)")
    if bad:
        raise ConfigError(
            f"checkpoint.init_from={path} conflicts with the configured model shape: "
            f"{', '.join(bad)}; drop those [model] settings (the shape comes from the "
            "pretrained config) or pick a matching model"
        )
    for key in _SHAPE_KEYS:
        setattr(m, key, getattr(hf, key))
    m.tie_embeddings, m.bias = hf.tie_embeddings, hf.bias


def check_model(model: GPTConfig, cfg: Config) -> None:
    _check_moe(model, cfg)
    _require(
        model.n_embd % model.n_head == 0,
        f"model.n_embd={model.n_embd} must be divisible by model.n_head={model.n_head}; "
        "change either",
    )
    seq_len = cfg.training.seq_len
    _require(
        seq_len <= model.block_size,
        f"training.seq_len={seq_len} exceeds the model block_size {model.block_size} "
        f"(preset {cfg.model.preset!r}); lower training.seq_len or raise model.block_size",
    )


# ---------------------------------------------------------------------------- layout


def check_layout(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    """Every rule a layout must satisfy for this model and batch (the world size is already
    dims.world_size). Also the planner's filter (gpt3d/planner)."""
    _check_tp(dims.tp, model, training, parallel)
    _check_pipeline(dims.pp, model, parallel)
    _check_batch(dims, training, parallel)
    _check_experts(dims, model, training, parallel)
    _check_grad_reduction(dims, parallel)
    _check_reshard_per_microbatch(dims, parallel)


def _check_tp(tp: int, model: GPTConfig, training, parallel) -> None:
    if tp == 1:
        return
    _require(
        model.n_head % tp == 0,
        f"model.n_head={model.n_head} is not divisible by parallel.tp={tp}: tensor "
        f"parallelism splits whole attention heads; pick tp dividing {model.n_head}",
    )
    _require(
        model.n_embd % tp == 0, f"model.n_embd={model.n_embd} is not divisible by parallel.tp={tp}"
    )
    _require(
        model.padded_vocab_size % tp == 0,
        f"vocabulary of {model.padded_vocab_size} rows is not divisible by parallel.tp={tp}; "
        f"pad it: --model.pad_vocab_multiple={64 if 64 % tp == 0 else tp} "
        "(padded rows never count in the loss)",
    )
    _require(
        not parallel.sequence_parallel or training.seq_len % tp == 0,
        f"sequence parallelism splits the sequence over tp: training.seq_len="
        f"{training.seq_len} must be divisible by parallel.tp={tp}",
    )


def _check_pipeline(pp: int, model: GPTConfig, parallel) -> None:
    name, v = parallel.pp_schedule, parallel.pp_stages_per_rank
    if pp == 1:
        _require(
            v == 1 and not parallel.pp_layer_split,
            "pp_stages_per_rank / pp_layer_split need parallel.pp > 1",
        )
        return
    _require(
        name not in SINGLE_STAGE_SCHEDULES or v == 1,
        f"schedule {name} runs one stage per rank: set parallel.pp_stages_per_rank=1, "
        "or pick Interleaved1F1B/LoopedBFS/InterleavedZeroBubble for virtual stages",
    )
    _require(
        name not in V_SCHEDULES or v == 2,
        f"schedule {name} needs parallel.pp_stages_per_rank=2 (got {v})",
    )
    _require(
        name in SINGLE_STAGE_SCHEDULES or v >= 2,
        f"schedule {name} needs parallel.pp_stages_per_rank >= 2 (got {v})",
    )
    _check_layer_split(pp * v, model.n_layer, parallel.pp_layer_split)
    _check_microbatches(name, n_microbatches(parallel), pp, pp * v)


def _check_layer_split(n_stages: int, n_layer: int, split: list[int]) -> None:
    if not split:
        _require(
            n_layer >= n_stages,
            f"{n_layer} transformer layers cannot fill {n_stages} pipeline stages "
            "(pp x pp_stages_per_rank); lower parallel.pp or pp_stages_per_rank",
        )
        return
    _require(
        len(split) == n_stages and sum(split) == n_layer and min(split) >= 0,
        f"parallel.pp_layer_split={split} must list {n_stages} non-negative block counts "
        f"(one per stage) summing to model.n_layer={n_layer}",
    )


def _check_microbatches(name: str, m: int, pp: int, n_stages: int) -> None:
    need = {"1F1B": pp, "DualPipeV": n_stages}.get(name, 1)
    _require(
        m >= need,
        f"schedule {name} needs at least {need} microbatches (got "
        f"parallel.pp_microbatches={m}); raise --parallel.pp_microbatches",
    )
    rounds = max(1, m // pp)
    _require(
        name not in ("Interleaved1F1B", "InterleavedZeroBubble") or m % rounds == 0,
        f"schedule {name} needs pp_microbatches to be a multiple of the rounds "
        f"(microbatches // pp = {rounds}); use a multiple of pp={pp}",
    )


def _check_batch(dims: ParallelDims, training, parallel) -> None:
    m = n_microbatches(parallel) if dims.pp > 1 else 1
    per_step = dims.dp * training.grad_accum * m
    _require(
        training.global_batch_size % per_step == 0,
        f"training.global_batch_size={training.global_batch_size} is not divisible by "
        f"dp ({dims.dp}) x grad_accum ({training.grad_accum}) x pipeline microbatches "
        f"({m}) = {per_step}; use a multiple of {per_step}",
    )


def _check_grad_reduction(dims: ParallelDims, parallel) -> None:
    """Gradient compression names the dp_replicate axis: it needs one that all-reduces."""
    from gpt3d.parallel.compression import replicate_all_reduces

    _require(
        not parallel.grad_reduce_dtype_replicate or dims.dp_replicate > 1,
        f"parallel.grad_reduce_dtype_replicate={parallel.grad_reduce_dtype_replicate} sets "
        "the dtype over dp_replicate, and this layout has dp_replicate=1; drop it, or use "
        "parallel.grad_reduce_dtype (every data-parallel axis)",
    )
    if parallel.grad_compression != "powersgd" or replicate_all_reduces(dims, parallel.dp_mode):
        return
    why = (
        "this layout has dp_replicate=1"
        if dims.dp_replicate == 1
        else "with dp_mode=fsdp and dp_shard=1 FSDP shards over dp_replicate"
    )
    raise ConfigError(
        f"parallel.grad_compression=powersgd compresses the all-reduce over dp_replicate, and "
        f"{why}: an FSDP reduce-scatter cannot be low-rank compressed (each rank keeps only "
        "its shard); use --parallel.dp_mode=ddp, HSDP (dp_replicate > 1 and dp_shard > 1), "
        "or --parallel.grad_reduce_dtype=bfloat16"
    )


def _check_reshard_per_microbatch(dims: ParallelDims, parallel) -> None:
    if not parallel.fsdp_reshard_per_microbatch:
        return
    flag = "parallel.fsdp_reshard_per_microbatch"
    _require(
        dims.pp > 1 and dims.dp_shard > 1 and parallel.dp_mode == "fsdp",
        f"{flag} is for FSDP under pipelining (pp > 1, dp_shard > 1, dp_mode=fsdp); without "
        "pp FSDP reshards after every block already",
    )
    _require(
        parallel.pp_schedule not in SPLIT_BACKWARD_SCHEDULES,
        f"{flag} does not work with {parallel.pp_schedule}: a split backward computes the "
        "weight gradients after FSDP's per-block hook would have reduce-scattered them; use "
        "GPipe, 1F1B, Interleaved1F1B or LoopedBFS",
    )


def _check_moe(model: GPTConfig, cfg: Config) -> None:
    """Mixture-of-Experts settings (docs/moe.md) that the model itself cannot run."""
    from gpt3d.config import MOE_SHAPE_KEYS
    from gpt3d.model import check_moe_config

    if not model.n_experts:
        given = [
            f"model.{k}={getattr(cfg.model, k)}" for k in MOE_SHAPE_KEYS if getattr(cfg.model, k)
        ]
        _require(
            not given,
            f"{', '.join(given)} set on a dense model (preset {cfg.model.preset!r} has no "
            "experts): set model.n_experts, or use preset moe-mini / gpt2-moe",
        )
        return
    try:
        check_moe_config(model)
    except ValueError as e:
        raise ConfigError(f"model: {e}; fix the [model] MoE settings") from None
    _require(
        not cfg.checkpoint.init_from,
        "checkpoint.init_from loads a dense GPT-2; it cannot start a Mixture-of-Experts model "
        f"(model.n_experts={model.n_experts}): train the MoE model from scratch",
    )


def _check_experts(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    """Expert parallelism borrows ep from dp_shard; experts under tp split their hidden dim."""
    ep, E = dims.ep, model.n_experts
    if ep > 1:
        _require(
            E > 0,
            f"parallel.ep={ep} needs a Mixture-of-Experts model: set model.n_experts "
            "(or preset moe-mini / gpt2-moe), or parallel.ep=1",
        )
        _require(
            parallel.dp_mode == "fsdp",
            f"parallel.ep={ep} is borrowed from the FSDP shard axis dp_shard; dp_mode=ddp has "
            "none: use --parallel.dp_mode=fsdp",
        )
        _require(
            dims.dp_shard % ep == 0,
            f"parallel.ep={ep} must divide dp_shard={dims.dp_shard}: ep is borrowed from the "
            "data-parallel shard axis (dp_shard = ep x the experts' FSDP degree); raise "
            "parallel.dp_shard or lower parallel.ep",
        )
        _require(
            E % ep == 0,
            f"model.n_experts={E} is not divisible by parallel.ep={ep}: every ep rank holds "
            f"n_experts/ep whole experts; pick ep dividing {E}",
        )
    if E and dims.tp > 1:
        _require(
            model.expert_hidden % dims.tp == 0,
            f"the experts' hidden width {model.expert_hidden} is not divisible by parallel.tp="
            f"{dims.tp} (tensor parallel splits each expert's hidden dim); set model.moe_hidden",
        )
    _require(
        not (training.compile and E and (ep > 1 or dims.tp > 1)),
        "training.compile with a MoE model runs on one process or data parallel only: the "
        "expert dispatch (all-to-all with data-dependent splits) is not traced; set "
        "--training.compile=false",
    )


# ---------------------------------------------------------------------------- plan, resume


def _plan_rules(model: GPTConfig, cfg: Config, dims: ParallelDims) -> list:
    """The plan file's rules ([modules] for tp, [experts] for MoE experts), checked against
    the full model's module names (and, for a MoE model, which rules cover its experts)."""
    import torch

    from gpt3d.model import GPT
    from gpt3d.parallel.expert_parallel import check_expert_rules
    from gpt3d.parallel.tensor_parallel import check_plan_matches, load_plan, plan_path

    with torch.device("meta"):
        types = {n: type(m).__name__ for n, m in GPT(model).named_modules() if n}
    p = cfg.parallel
    path = plan_path(p.plan, p.sequence_parallel, moe=model.n_experts > 0)
    rules = load_plan(path)
    check_expert_rules(rules, types, path, dims.tp, dims.ep)
    check_plan_matches(rules, list(types), path)
    return rules


def _verified_resume(cfg: Config, model: GPTConfig, rank: int = 0) -> Path | None:
    """checkpoint.resume -> a verified checkpoint directory, or None for a fresh start
    ("auto" with nothing saved yet is a fresh start). Only rank 0 reads every byte for the
    checksums and samples the dataset for its fingerprint: a damaged file or another dataset
    ends the job there while the others wait in the process group."""
    path = find_resume(cfg.checkpoint.resume, cfg.job.output_dir)
    if path is None:
        return None
    meta = verify(path, model, checksums=cfg.checkpoint.verify_checksums and rank == 0)
    if rank == 0:
        _check_same_dataset(path, meta, cfg)
    _check_room_for_next(path, meta, cfg)
    loader = meta["loader"]
    for key, now in (("seed", cfg.job.seed), ("seq_len", cfg.training.seq_len)):
        if loader[key] != now:  # the sample order depends on both
            raise CheckpointError(
                f"checkpoint {path} was trained with {key}={loader[key]}, this run has {now}; "
                "resuming would change the data order: use the same value "
                "(job.seed / training.seq_len)"
            )
    return path


def _check_same_dataset(path: Path, meta: dict, cfg: Config) -> None:
    """The checkpoint's dataset fingerprint (gpt3d/integrity.py) against data.dataset's."""
    from gpt3d.integrity import dataset_differences, dataset_fingerprint

    saved = meta.get("dataset")
    if saved is None or cfg.checkpoint.allow_dataset_change:
        return
    diffs = dataset_differences(saved, dataset_fingerprint(cfg.data.dataset))
    if diffs:
        raise DataError(
            f"checkpoint {path} was trained on another dataset than data.dataset="
            f"{cfg.data.dataset}: {'; '.join(diffs[:4])}; resume on the checkpoint's dataset, "
            "or set --checkpoint.allow_dataset_change=true to continue on this data on "
            "purpose (e.g. fine-tuning on new data)"
        )


def _check_room_for_next(path: Path, meta: dict, cfg: Config) -> None:
    """A resumed run that saves needs room for one more checkpoint of this size (old ones
    are pruned only after the new one is complete): a restart after a disk-full save stops
    here, at once, instead of recomputing steps to fail at the same save again."""
    from gpt3d.integrity import DiskFullError, free_bytes

    c = cfg.checkpoint
    if not (c.interval or c.save_final):
        return
    root = checkpoint_root(cfg.job.output_dir)
    need, free = sum(meta["files"].values()), free_bytes(root)
    if need > free:
        raise DiskFullError(
            f"no room for the next checkpoint: {path.name} takes {need / 2**20:,.1f} MiB and "
            f"{root} has {free / 2**20:,.1f} MiB free; free space (or lower "
            "checkpoint.keep_last) or move job.output_dir, then resume"
        )
