"""The bad-input catalogue, in one place. Every case is one gpt3d.errors.UserError whose
single line names the problem; all are raised before any process group exists.

tests/unit/test_config.py checks FIELD_ERRORS (load_config), tests/unit/test_errors.py
checks RUN_ERRORS (preflight) and the damaged datasets, and tests/distributed/
test_failures.py launches the few whose behaviour across ranks only a real launch shows.
"""

from __future__ import annotations

# name -> (argv, text the message contains): one field against its declaration.
FIELD_ERRORS = {
    "unknown section": (["--trainig.steps=1"], "trainig"),
    "unknown section lists valid": (["--trainig.steps=1"], "training"),
    "unknown key": (["--training.stepz=1"], "stepz"),
    "unknown key closest": (["--training.stepz=1"], "'steps'"),
    "key in other section": (["--training.preset=mini"], "[model]"),
    "bad int": (["--training.steps=ten"], "training.steps"),
    "float for int": (["--training.steps=1.5"], "training.steps"),
    "bad float": (["--training.lr=fast"], "training.lr"),
    "bad bool": (["--training.compile=maybe"], "training.compile"),
    "bad list": (["--parallel.pp_layer_split=1,x"], "parallel.pp_layer_split"),
    "bad toml list": (["--parallel.pp_layer_split=[1,"], "parallel.pp_layer_split"),
    "malformed override": (["training.steps=1"], "training.steps=1"),
    "malformed no dot": (["--steps=1"], "--section.key=value"),
    "missing value": (["--training.steps"], "training.steps"),
    "config without path": (["--config"], "--config"),
    "missing config file": (["--config", "nope/missing.toml"], "missing.toml"),
    "steps": (["--training.steps=0"], "training.steps"),
    "global_batch_size": (["--training.global_batch_size=0"], "training.global_batch_size"),
    "seq_len": (["--training.seq_len=0"], "training.seq_len"),
    "lr": (["--training.lr=0"], "training.lr"),
    "min_lr negative": (["--training.min_lr=-1e-4"], "training.min_lr"),
    "warmup negative": (["--training.warmup_steps=-1"], "training.warmup_steps"),
    "weight_decay": (["--training.weight_decay=-0.1"], "training.weight_decay"),
    "grad_clip": (["--training.grad_clip=-1"], "training.grad_clip"),
    "beta1 >= 1": (["--training.beta1=1"], "training.beta1"),
    "beta2 < 0": (["--training.beta2=-0.5"], "training.beta2"),
    "grad_accum": (["--training.grad_accum=0"], "training.grad_accum"),
    "log_interval": (["--training.log_interval=0"], "training.log_interval"),
    "dtype": (["--training.dtype=float16"], "training.dtype"),
    "ac mode": (["--training.activation_checkpointing=some"], "activation_checkpointing"),
    "ac_every": (["--training.ac_every=0"], "training.ac_every"),
    "dp_mode": (["--parallel.dp_mode=zero3"], "parallel.dp_mode"),
    "dp_replicate": (["--parallel.dp_replicate=0"], "parallel.dp_replicate"),
    "pp": (["--parallel.pp=0"], "parallel.pp"),
    "tp": (["--parallel.tp=0"], "parallel.tp"),
    "pp_schedule": (["--parallel.pp_schedule=1f2b"], "parallel.pp_schedule"),
    "pp_stages_per_rank": (["--parallel.pp_stages_per_rank=0"], "parallel.pp_stages_per_rank"),
    "keep_last": (["--checkpoint.keep_last=0"], "checkpoint.keep_last"),
    "dropout >= 1": (["--model.dropout=1.0"], "model.dropout"),
    "dropout < 0": (["--model.dropout=-0.1"], "model.dropout"),
    "preset": (["--model.preset=gpt5"], "model.preset"),
    "pad_vocab_multiple": (["--model.pad_vocab_multiple=0"], "model.pad_vocab_multiple"),
    "n_layer negative": (["--model.n_layer=-1"], "model.n_layer"),
    "peak_tflops": (["--metrics.peak_tflops=-1"], "metrics.peak_tflops"),
}

_PLAN_OK = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=64"]
_SP = "--parallel.sequence_parallel=true"

# name -> (world size, argv on top of tests.helpers.SMALL_MODEL, text the message contains):
# rules between values, the model, the layout, the batch and the plan file (preflight).
RUN_ERRORS = {
    "min_lr > lr": (1, ["--training.min_lr=1e-2"], "training.min_lr"),
    "eval_steps": (1, ["--training.eval_interval=5", "--training.eval_steps=0"], "eval_steps"),
    "dp_shard 0": (1, ["--parallel.dp_shard=0"], "parallel.dp_shard"),
    "seq_len > block": (1, ["--training.seq_len=33"], "training.seq_len=33"),
    "n_embd % n_head": (1, ["--model.n_head=3"], "model.n_head=3"),
    "world size": (3, ["--parallel.tp=2"], "world size 3"),
    "world size product": (4, ["--parallel.tp=2", "--parallel.dp_shard=1"], "--nproc_per_node=2"),
    "heads vs tp": (2, ["--parallel.tp=2", "--model.n_head=3", "--model.n_embd=48"], "n_head=3"),
    "vocab vs tp": (2, ["--parallel.tp=2", "--model.vocab_size=511"], "pad_vocab_multiple"),
    "layers vs stages": (4, ["--parallel.pp=4", "--parallel.pp_microbatches=4"], "cannot fill 4"),
    "1f1b microbatches": (
        2,
        ["--parallel.pp=2", "--parallel.pp_microbatches=1"],
        "at least 2 microbatches",
    ),
    "batch vs dp": (2, ["--training.global_batch_size=5"], "global_batch_size=5"),
    "batch vs microbatches": (
        2,
        ["--parallel.pp=2", "--parallel.pp_microbatches=3"],
        "global_batch_size=8",
    ),
    "sp seq_len": (2, ["--parallel.tp=2", _SP, "--training.seq_len=15"], "seq_len=15"),
    "v schedule stages": (
        2,
        ["--parallel.pp=2", "--parallel.pp_schedule=DualPipeV"],
        "pp_stages_per_rank=2",
    ),
    "single-stage schedule": (
        2,
        ["--parallel.pp=2", "--parallel.pp_stages_per_rank=2"],
        "runs one stage per rank",
    ),
    "stages without pp": (1, ["--parallel.pp_stages_per_rank=2"], "need parallel.pp > 1"),
    "ddp with dp_shard": (2, ["--parallel.dp_mode=ddp", "--parallel.dp_shard=2"], "dp_mode='ddp'"),
    "layer split": (2, ["--parallel.pp=2", "--parallel.pp_layer_split=1,0"], "pp_layer_split"),
    "interleaved rounds": (
        4,
        [
            *_PLAN_OK,
            "--parallel.pp=2",
            "--parallel.pp_schedule=Interleaved1F1B",
            "--parallel.pp_stages_per_rank=2",
            "--parallel.pp_microbatches=5",
            "--training.global_batch_size=10",
        ],
        "multiple of the rounds",
    ),
    "reshard per microbatch without pp": (
        2,
        ["--parallel.dp_mode=fsdp", "--parallel.fsdp_reshard_per_microbatch=true"],
        "is for FSDP under pipelining",
    ),
    "reshard per microbatch with a split backward": (
        4,
        [
            *_PLAN_OK,
            "--parallel.dp_mode=fsdp",
            "--parallel.pp=2",
            "--parallel.pp_schedule=ZBVZeroBubble",
            "--parallel.pp_stages_per_rank=2",
            "--parallel.fsdp_reshard_per_microbatch=true",
        ],
        "does not work with ZBVZeroBubble",
    ),
    "table by vocabulary rows with gathered logits": (
        4,
        [
            *_PLAN_OK,
            "--parallel.tp=2",
            "--parallel.loss_parallel=false",
            "--parallel.embedding_sharding=vocab",
        ],
        "(parallel.loss_parallel)",
    ),
    "table by vocabulary rows with tp, seq_len not divisible": (
        4,
        [
            *_PLAN_OK,
            "--parallel.tp=2",
            "--training.seq_len=31",
            "--parallel.embedding_sharding=vocab",
        ],
        "training.seq_len divisible by tp (2)",
    ),
    "plan name": (2, ["--parallel.tp=2", "--parallel.plan=gpt_tq"], "not a shipped plan"),
    "plan file missing": (2, ["--parallel.tp=2", "--parallel.plan=nope.toml"], "nope.toml"),
}

# Plan file text -> message (written to a file and passed as parallel.plan with tp=2).
PLAN_ERRORS = {
    "malformed": ('[modules."wte"\n', "not valid TOML"),
    "no match": ('[modules."h.*.attn.qproj"]\nstyle = "colwise"', "matches no module"),
    "closest": ("[modules.\"h.*.atn.q_proj\"]\nstyle = 'colwise'", "closest module names"),
    "unknown style": ('[modules."wte"]\nstyle = "vocab_parallel"', "unknown style"),
    "did you mean": ("[modules.\"h.*.attn.q_proj\"]\nstyle = 'colwize'", "did you mean 'colwise'"),
    "bad layout": ('[modules."wte"]\nstyle = "rowwise"\ninput_layouts = "diagonal"', "layouts are"),
    "wrong key": (
        "[modules.\"h.*.attn.q_proj\"]\nstyle = 'colwise'\ndesired_input_layouts = 'replicate'",
        "style colwise takes",
    ),
    "no style": ("[modules.\"wte\"]\ninput_layouts = 'replicate'", "needs style"),
    "no modules table": ("[plan]\nx = 1", "expected \\[modules"),
}
