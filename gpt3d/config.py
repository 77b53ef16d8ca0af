"""Typed run configuration: defaults < TOML file (--config) < --section.key=value overrides.

Each section is a dataclass whose fields carry a help string in ``metadata["help"]`` (and,
where it applies, ``choices`` or bounds ``ge`` / ``gt`` / ``lt``), so ``--help``, type
checking and the per-field checks are driven by the same declarations:

    cfg = load_config(["--config", "recipes/configs/debug.toml", "--training.steps=5"])
    cfg.training.steps  # 5

Config files are self-contained TOML (no includes): every recipe repeats the keys it needs,
nanoGPT style, so one file tells the whole story. Paths (config files, datasets, plan files)
are relative to the current directory. Rules that relate several values (lr vs min_lr, the
layout vs the world size, the model vs the data) are checked once, in gpt3d/preflight.py.
"""

import dataclasses
import difflib
import json
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt3d.errors import ConfigError
from gpt3d.model import PRESETS, GPTConfig, preset_config
from gpt3d.moe import IMPLS as MOE_IMPLS
from gpt3d.parallel.dims import PP_SCHEDULES

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _f(
    default: Any,
    help: str,
    *,
    choices: tuple = (),
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
) -> Any:
    """A field with its help text and optional allowed values / bounds as metadata."""
    meta = {"help": help, "choices": tuple(choices), "ge": ge, "gt": gt, "lt": lt}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class JobConfig:
    """Run identity, output directory, seed and logging."""

    name: str = _f("gpt3d", "run name shown in logs and metric files")
    output_dir: str = _f("out/shakespeare", "directory for checkpoints, metrics and plots")
    seed: int = _f(1337, "seed for weight init, data order and dropout")
    log_all_ranks: bool = _f(
        False, "print logs from every rank, prefixed with the rank; default only rank 0"
    )
    malloc_mmap_threshold_kb: int = _f(
        -1,
        "CPU (glibc): blocks above this size are mmap'ed and returned to the OS when freed, "
        "smaller ones are reused from the heap; -1 = on CPU 64 (lean) while the model is "
        "built, then 262144 (fast: no page faults for a step's temporaries) where the "
        "unsharded state fits comfortably and is not sharded over data parallel, else 64; "
        "untouched on GPU hosts; 0 = glibc's default (docs/memory.md)",
        ge=-1,
    )


@dataclass
class ModelConfig:
    """Model shape: a preset from gpt3d.model.PRESETS plus optional overrides."""

    preset: str = _f("mini", "base shape from gpt3d.model.PRESETS", choices=tuple(PRESETS))
    n_layer: int = _f(0, "transformer blocks; 0 = take it from the preset", ge=0)
    n_head: int = _f(0, "attention heads; 0 = take it from the preset", ge=0)
    n_embd: int = _f(0, "embedding width; 0 = take it from the preset", ge=0)
    block_size: int = _f(0, "longest sequence (position table); 0 = take it from the preset", ge=0)
    vocab_size: int = _f(0, "real vocabulary size; 0 = take it from the preset", ge=0)
    pad_vocab_multiple: int = _f(
        1,
        "pad embedding rows to a multiple of this (64: 50257 -> 50304); tensor parallel "
        "needs the padded vocab divisible by tp",
        ge=1,
    )
    dropout: float = _f(0.0, "dropout probability in [0, 1)", ge=0.0, lt=1.0)
    bias: bool = _f(True, "biases in Linear and LayerNorm layers (GPT-2 has them)")
    tie_embeddings: bool = _f(True, "share the token embedding with the output head")
    # Mixture of Experts (docs/moe.md): shape keys take the preset's value when 0.
    n_experts: int = _f(0, "routed experts per MoE block; 0 = the preset's (0: dense)", ge=0)
    moe_top_k: int = _f(0, "experts each token is sent to; 0 = the preset's", ge=0)
    moe_every: int = _f(
        0, "block i is MoE iff i % moe_every == moe_every-1 (1: all); 0 = the preset's", ge=0
    )
    moe_hidden: int = _f(
        0, "expert hidden width; 0 = the preset's (default 4*n_embd/moe_top_k)", ge=0
    )
    moe_aux_coef: float = _f(
        1e-4, "DeepSeek-V3 sequence-wise balance loss coefficient (MoE only); 0 = off", ge=0.0
    )
    moe_bias_rate: float = _f(
        1e-3, "aux-loss-free balancing bias step per optimizer step (MoE only); 0 = off", ge=0.0
    )
    moe_impl: str = _f(
        "auto", "expert matmuls: grouped GEMM where supported, or a loop", choices=MOE_IMPLS
    )


@dataclass
class DataConfig:
    """Token dataset made by recipes/prepare.py."""

    dataset: str = _f(
        "recipes/data/shakespeare", "directory with train.bin, val.bin, meta.json (prepare.py)"
    )


@dataclass
class TrainingConfig:
    """Optimisation, learning-rate schedule, evaluation, precision and memory savers."""

    steps: int = _f(200, "optimizer steps to run", ge=1)
    global_batch_size: int = _f(
        16, "sequences per optimizer step, over all data-parallel ranks", ge=1
    )
    seq_len: int = _f(128, "tokens per sequence; at most the model's block_size", ge=1)
    grad_accum: int = _f(
        1,
        "microbatches per data-parallel rank per step when not pipelining; each is "
        "global_batch_size/(dp*grad_accum) sequences",
        ge=1,
    )
    lr: float = _f(1e-3, "peak learning rate (after warmup)", gt=0.0)
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine decay, in [0, lr]", ge=0.0)
    warmup_steps: int = _f(20, "linear warmup steps from 0 to lr", ge=0)
    lr_decay_steps: int = _f(0, "steps of cosine decay to min_lr; 0 = steps", ge=0)
    weight_decay: float = _f(0.1, "AdamW weight decay (2D weights only)", ge=0.0)
    beta1: float = _f(0.9, "AdamW beta1, in [0, 1)", ge=0.0, lt=1.0)
    beta2: float = _f(0.95, "AdamW beta2, in [0, 1)", ge=0.0, lt=1.0)
    grad_clip: float = _f(1.0, "clip the global grad norm to this; 0 disables", ge=0.0)
    eval_interval: int = _f(50, "evaluate on val every N steps; 0 disables", ge=0)
    eval_steps: int = _f(4, "batches per evaluation")
    log_interval: int = _f(10, "log metrics every N steps", ge=1)
    dtype: str = _f("float32", "compute dtype", choices=("float32", "bfloat16"))
    compile: bool = _f(False, "torch.compile the model (see compile_scope)")
    compile_scope: str = _f(
        "blocks",
        "with compile: 'blocks' compiles each transformer block; 'stage' compiles the model and "
        "the loss as one graph (with pp > 1 the schedule drives each stage: its blocks and the "
        "loss are compiled)",
        choices=("blocks", "stage"),
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode; reduce-overhead uses CUDA graphs (GPU), max-autotune searches "
        "kernel configurations (slow first step)",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    activation_checkpointing: str = _f(
        "none", "recompute activations in backward", choices=("none", "full", "selective")
    )
    ac_every: int = _f(2, "with selective: checkpoint every k-th block", ge=1)
    fused_optimizer: bool = _f(True, "use fused/foreach AdamW where the device supports it")
    memory_check: str = _f(
        "auto",
        "before building anything, predict the per-rank peak memory and refuse a run that "
        "cannot fit, naming a layout that does (docs/planner.md): auto = the analytic model "
        "on GPUs, off on CPU; fake = the fake-tensor estimate of every pipeline rank (seconds)",
        choices=("auto", "analytic", "fake", "off"),
    )
    memory_limit_gib: float = _f(
        0.0,
        "memory one rank may use for the memory check; 0 = the GPU's free memory (CPU: the "
        "available RAM / processes on this node)",
        ge=0.0,
    )


@dataclass
class ParallelConfig:
    """3D layout: mesh axis degrees (pp, dp_replicate, dp_shard, tp) and how each is applied."""

    dp_replicate: int = _f(1, "data-parallel replicas (HSDP outer axis / DDP)", ge=1)
    dp_shard: int = _f(-1, "FSDP shard degree; -1 = whatever is left of the world size")
    pp: int = _f(1, "pipeline-parallel degree (ranks per pipeline)", ge=1)
    tp: int = _f(1, "tensor-parallel degree", ge=1)
    pp_schedule: str = _f("1F1B", "pipeline schedule (case-insensitive)", choices=PP_SCHEDULES)
    pp_microbatches: int = _f(0, "microbatches per pipeline step; 0 = number of stages", ge=0)
    pp_stages_per_rank: int = _f(
        1, "virtual stages per rank, >1 for interleaved/looped/V schedules", ge=1
    )
    pp_layer_split: list[int] = _f(
        [], "transformer blocks per stage, must sum to n_layer; empty = even split"
    )
    plan: str = _f(
        "",
        "tensor-parallel plan: a plan shipped in gpt3d/plans by name (gpt_tp, gpt_tp_sp) or a "
        "path to your own .toml; empty = gpt_tp, or gpt_tp_sp when sequence_parallel",
    )
    sequence_parallel: bool = _f(False, "shard LayerNorm/dropout activations over the sequence")
    loss_parallel: bool = _f(True, "compute the loss on vocab-sharded logits (no all-gather)")
    dp_mode: str = _f(
        "auto",
        "data-parallel wrapper: fsdp (FSDP2: shard params, grads, optimizer state), ddp "
        "(replicate), or auto: ddp when the unsharded model state takes at most a quarter of a "
        "rank's memory and no sharding is asked for, else fsdp (the choice is logged)",
        choices=("auto", "fsdp", "ddp"),
    )
    grad_reduce_dtype: str = _f(
        "float32",
        "dtype of the data-parallel gradient reduction on every dp axis; float16 is scaled by "
        "a power of two per buffer so small gradients do not underflow (docs/compression.md)",
        choices=("float32", "bfloat16", "float16"),
    )
    grad_reduce_dtype_replicate: str = _f(
        "",
        "dtype of the reduction over dp_replicate only (HSDP's inter-node axis, DDP's axis); "
        "empty = grad_reduce_dtype",
        choices=("", "float32", "bfloat16", "float16"),
    )
    grad_compression: str = _f(
        "none",
        "low-rank compression of the all-reduce over dp_replicate (ddp mode or HSDP): "
        "powersgd = rank powersgd_rank with warm start and error feedback",
        choices=("none", "powersgd"),
    )
    powersgd_rank: int = _f(4, "rank of PowerSGD's gradient approximation", ge=1)
    powersgd_start_step: int = _f(
        10, "optimizer steps reduced uncompressed before PowerSGD starts", ge=0
    )
    fsdp_reshard_per_microbatch: bool = _f(
        False,
        "FSDP under pp: reshard each block after every microbatch's forward and backward and "
        "reduce-scatter its gradient each time, so a rank never holds its stage unsharded "
        "(torch's schedules otherwise keep it whole for the step); costs microbatches x "
        "FSDP's traffic; not with the split-backward schedules",
    )
    embedding_sharding: str = _f(
        "auto",
        "how FSDP holds the token embedding / lm_head table: fsdp (in the root group: gathered "
        "whole for the step, with its whole gradient), vocab (sharded by vocabulary rows over "
        "dp_shard, x tp in place of the plan's wte / lm_head rules, for the whole step; token "
        "ids and hidden states are gathered instead: dp_mode=fsdp, dp_shard > 1, no HSDP or "
        "ep), or auto: vocab where it applies and the gathered tokens are at most half the "
        "vocabulary's rows per tp rank (docs/memory.md)",
        choices=("auto", "fsdp", "vocab"),
    )
    timeout_s: float = _f(0.0, "collective timeout in seconds; 0 = 1800 on GPU, 120 on CPU", ge=0.0)
    ep: int = _f(
        1,
        "expert-parallel degree (MoE): experts split over ep ranks borrowed from dp_shard "
        "(dp_shard = ep x the experts' FSDP degree)",
        ge=1,
    )


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (DCP) under output_dir/checkpoints."""

    interval: int = _f(0, "save every N steps; 0 = only at the end", ge=0)
    keep_last: int = _f(3, "keep this many most recent checkpoints", ge=1)
    async_save: bool = _f(False, "write checkpoints in the background")
    resume: str = _f(
        "", '"" = fresh start, "auto" = latest complete checkpoint in output_dir, or a path'
    )
    init_from: str = _f("", "Hugging Face GPT-2 directory or .safetensors file to start from")
    save_final: bool = _f(True, "save a checkpoint after the last step")
    verify_checksums: bool = _f(
        True,
        "on resume, rank 0 checks every file's crc32 against meta.json (reads the whole "
        "checkpoint once); false skips it for huge checkpoints",
    )
    allow_dataset_change: bool = _f(
        False,
        "resume even though data.dataset is not the dataset the checkpoint was trained on "
        "(on purpose: continuing on new data)",
    )


@dataclass
class MetricsConfig:
    """Throughput / MFU accounting and outputs."""

    peak_tflops: float = _f(
        0.0,
        "peak dense TFLOP/s per device for MFU; 0 = the datasheet on GPUs, the matmul peak "
        "measured at start-up on CPUs",
        ge=0.0,
    )
    tensorboard: bool = _f(False, "also write TensorBoard event files")
    plot: bool = _f(True, "loss-curve PNG at the end if matplotlib is installed")
    wandb: bool = _f(
        False,
        "also log to Weights & Biases (rank 0; the metrics.jsonl fields and the config; "
        "needs `pip install 'gpt3d[wandb]'`; WANDB_MODE=offline writes only locally)",
    )
    wandb_project: str = _f("gpt3d", "W&B project; the run is named after job.name")


@dataclass
class ProfilingConfig:
    """torch.profiler traces (Chrome/Perfetto JSON) of a window of steps, on chosen ranks,
    under <output_dir>/profile; open them in https://ui.perfetto.dev (docs/data.md)."""

    trace: bool = _f(False, "write a torch.profiler trace of steps [start_step, +steps)")
    start_step: int = _f(5, "first traced step (1 = the first step; one warm-up step before)", ge=1)
    steps: int = _f(2, "number of traced steps", ge=1)
    ranks: list[int] = _f([0], "global ranks that trace; [] = every rank")
    record_shapes: bool = _f(False, "record operator input shapes")
    profile_memory: bool = _f(False, "record tensor allocations and frees in the trace")
    with_stack: bool = _f(False, "record Python stacks (larger traces)")
    memory_snapshot: bool = _f(
        False,
        "CUDA only: also dump a CUDA caching-allocator snapshot of the same window "
        "(memory_rank<r>.pickle, open at https://pytorch.org/memory_viz)",
    )


@dataclass
class Config:
    """The whole run; one attribute per TOML section."""

    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def gpt_config(cfg: ModelConfig) -> GPTConfig:
    """The model shape: the preset with every non-zero dimension override applied."""
    dims = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    model = preset_config(
        cfg.preset,
        **{k: getattr(cfg, k) or None for k in (*dims, *MOE_SHAPE_KEYS)},
        pad_vocab_multiple=cfg.pad_vocab_multiple,
        dropout=cfg.dropout,
        bias=cfg.bias,
        tie_embeddings=cfg.tie_embeddings,
    )
    if not model.n_experts:  # a dense model keeps GPTConfig's MoE defaults
        return model
    moe = {k: getattr(cfg, k) for k in ("moe_aux_coef", "moe_bias_rate", "moe_impl")}
    return dataclasses.replace(model, **moe)


MOE_SHAPE_KEYS = ("n_experts", "moe_top_k", "moe_every", "moe_hidden")  # 0 = the preset's


# ---------------------------------------------------------------------------------- lookup


def _fields(section: str) -> dict[str, dataclasses.Field]:
    # No `from __future__ import annotations` in this module, so f.type is the real type.
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) else str(t)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1)
    return f"did you mean {match[0]!r}? " if match else ""


def _check_section(section: str, where: str) -> None:
    if section not in SECTIONS:
        hint = _closest(section, list(SECTIONS))
        raise ConfigError(
            f"{where}: unknown section {section!r}; {hint}valid sections: {', '.join(SECTIONS)}"
        )


def _field(section: str, key: str, where: str) -> dataclasses.Field:
    """The dataclass field for section.key, or a ConfigError listing what is valid."""
    _check_section(section, where)
    fields = _fields(section)
    if key not in fields:
        elsewhere = [s for s in SECTIONS if key in _fields(s)]
        hint = (
            f"{key!r} belongs in [{elsewhere[0]}]; " if elsewhere else _closest(key, list(fields))
        )
        raise ConfigError(
            f"{where}: unknown key {key!r} in [{section}]; {hint}valid keys: {', '.join(fields)}"
        )
    return fields[key]


# --------------------------------------------------------------------------- value parsing


def _top_level_key(name: str, where: str) -> None:
    """A bare `key = value` outside any [section]: say which section it belongs in."""
    owners = [s for s in SECTIONS if name in _fields(s)]
    if not owners:
        _check_section(name, where)  # raises: unknown section
    raise ConfigError(f"{where}: key {name!r} is outside any section; put it under [{owners[0]}]")


def _check_toml_value(name: str, value: Any, t: Any, example: Any, where: str = "") -> Any:
    """Type-check a TOML value against the field type (float also takes int)."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(t)
    if t == list[int]:
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    if not ok:
        got = f"{type(value).__name__} {value!r}"
        example = example or [2, 2] if t == list[int] else example
        raise ConfigError(
            f"{where}{name}: expected {_type_name(t)}, got {got}; write it like "
            f"{name.split('.')[-1]} = {_toml_value(example)}"
        )
    return float(value) if t is float else list(value) if t == list[int] else value


def _parse_cli_value(name: str, raw: str, t: Any) -> Any:
    """Parse an override string by the field type (bool: true/false/1/0/yes/no)."""
    try:
        if t is bool:
            return _BOOLS[raw.strip().lower()]
        if t == list[int]:
            raw = raw.strip()
            if raw.startswith("["):
                items = tomllib.loads(f"v = {raw}")["v"]
                return _check_toml_value(name, items, t, [1, 2])
            return [int(v) for v in raw.split(",") if v.strip()]
        return t(raw)
    except (KeyError, ValueError, tomllib.TOMLDecodeError):
        fix = {bool: "true/false/1/0/yes/no", int: "e.g. 100", float: "e.g. 3e-4", str: ""}
        raise ConfigError(
            f"--{name}: expected {_type_name(t)}, got {raw!r} ({fix.get(t, 'e.g. 2,2 or [2,2]')})"
        ) from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


# ---------------------------------------------------------------------------------- apply


def _apply_dict(cfg: Config, data: dict, where: str) -> None:
    """Set every section.key in a nested dict (a TOML document) onto cfg, type-checked."""
    for section, table in data.items():
        if not isinstance(table, dict):
            if section in SECTIONS:
                raise ConfigError(f"{where}: {section!r} must be a table: [{section}]")
            _top_level_key(section, where)
        _check_section(section, where)
        for key, value in table.items():
            f = _field(section, key, where)
            value = _check_toml_value(f"{section}.{key}", value, f.type, _default(f), f"{where}: ")
            setattr(getattr(cfg, section), key, value)


def _split_argv(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """--config paths and (section.key, raw value or None for a bare flag), in order."""
    configs, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if not eq and has_next:
            value, i = argv[i + 1], i + 1
        if name == "config":
            if not (eq or has_next):
                raise ConfigError("--config needs a path: --config recipes/configs/debug.toml")
            configs.append(value)
        elif "." in name and all(name.partition(".")[::2]):
            overrides.append((name.replace("-", "_"), value if eq or has_next else None))
        else:
            raise ConfigError(
                f"malformed argument {arg!r}; expected --config FILE or --section.key=value "
                "(e.g. --training.steps=100); see --help"
            )
        i += 1
    return configs, overrides


def _apply_override(cfg: Config, name: str, raw: str | None) -> None:
    section, _, key = name.partition(".")
    f = _field(section, key, f"--{name}")
    if raw is None:
        if f.type is not bool:
            raise ConfigError(f"--{name} needs a value: --{name}=VALUE")
        raw = "true"
    setattr(getattr(cfg, section), key, _parse_cli_value(name, raw, f.type))


def _read_toml(path: str) -> dict:
    found = Path(path)
    if not found.is_file():
        raise ConfigError(
            f"--config: config file {path!r} not found (from {Path.cwd()}); "
            "pass an existing .toml, e.g. recipes/configs/debug.toml"
        )
    try:
        return tomllib.loads(found.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML: {e}") from None


# ----------------------------------------------------------------------------- public API


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults, then each --config file, then --section.key overrides; then validate."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    configs, overrides = _split_argv(argv)
    cfg = Config()
    for path in configs:
        _apply_dict(cfg, _read_toml(path), where=path)
    for name, raw in overrides:
        _apply_override(cfg, name, raw)
    check_fields(cfg)
    return cfg


def check_fields(cfg: Config) -> None:
    """Each field against its declaration: type, allowed choices (normalising their case),
    bounds. Rules between fields are gpt3d/preflight.py's."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in _fields(section).values():
            name = f"{section}.{f.name}"
            value = _check_toml_value(name, getattr(obj, f.name), f.type, _default(f))
            setattr(obj, f.name, value)  # int -> float, list copy
            if f.metadata["choices"]:
                setattr(obj, f.name, _canonical_choice(name, value, f.metadata["choices"]))
            _check_bounds(name, value, f.metadata)


def _canonical_choice(name: str, value: str, choices: tuple) -> str:
    canon = {c.lower(): c for c in choices}
    if str(value).lower() not in canon:
        raise ConfigError(
            f"{name}={value!r} is not valid; {_closest(value, list(canon.values()))}"
            f"choose one of {', '.join(choices)}"
        )
    return canon[value.lower()]


def _check_bounds(name: str, value, meta: dict) -> None:
    for key, ok, words in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("lt", lambda v, b: v < b, "<"),
    ):
        bound = meta[key]
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{name}={value!r} must be {words} {bound}; set --{name}=<value>")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """{section: {key: value}} of plain TOML types (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every section and field with its type, default and doc."""
    lines = [
        "usage: [--config FILE.toml ...] [--section.key=VALUE | --section.key VALUE ...]",
        "Overrides apply after the config file (command line wins). bool: true/false/1/0/"
        "yes/no (a bare --section.flag means true); list: 1,2,3 or [1,2,3].",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]  {cls.__doc__}"]
        for f in _fields(section).values():
            default, choices = _default(f), f.metadata["choices"]
            lines.append(f"  --{section}.{f.name}  ({_type_name(f.type)}, default {default!r})")
            doc = f.metadata["help"] + (f"; one of {', '.join(choices)}" if choices else "")
            lines.append(textwrap.fill(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
