"""Tensor parallelism: a plan file (TOML) -> validated rules -> parallelize_module.

gpt3d ships its plans as package data (gpt3d/plans/*.toml): parallel.plan = "gpt_tp" (the
default) or "gpt_tp_sp" (sequence parallel) names one of them; any other value is a path to
your own file. A plan file maps module-name globs to parallel styles:

    [modules."h.*.attn.q_proj"]
    style = "colwise"                      # colwise | rowwise | sequence_parallel |
                                           # prepare_module_input | prepare_module_output
    [modules."h.*.attn.c_proj"]
    style = "rowwise"
    output_layouts = "shard(1)"            # replicate | shard(<dim>)

Globs match dot-separated name segments one by one ("h.*.attn" matches "h.3.attn", never
"h.3.attn.q_proj"). Every glob must match a module of the full model (an entry with
`optional = true` may match none: the dense-MLP rules of a plan for MoE models whose blocks
may all be MoE); a pipeline stage simply skips the entries for modules it does not hold.

A plan for Mixture-of-Experts models also has [experts."<glob>"] entries (style
"expert_parallel"), applied by gpt3d/parallel/expert_parallel.py over the ep and tp axes.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from gpt3d.errors import PlanError

PLANS_DIR = Path(__file__).resolve().parent.parent / "plans"  # package data
DEFAULT_PLAN, DEFAULT_SP_PLAN = "gpt_tp", "gpt_tp_sp"
DEFAULT_MOE_PLAN, DEFAULT_MOE_SP_PLAN = "gpt_moe", "gpt_moe_sp"  # models with n_experts > 0

LAYOUT_RE = re.compile(r"^\s*(replicate|shard\s*\(\s*(-?\d+)\s*\))\s*$", re.IGNORECASE)

# style -> allowed keys (besides "style") -> the torch class name and its keyword names.
STYLE_KEYS = {
    "colwise": {"input_layouts", "output_layouts", "use_local_output"},
    "rowwise": {"input_layouts", "output_layouts", "use_local_output"},
    "sequence_parallel": {"sequence_dim", "use_local_output"},
    "prepare_module_input": {"input_layouts", "desired_input_layouts", "use_local_output"},
    "prepare_module_output": {"output_layouts", "desired_output_layouts", "use_local_output"},
}
EXPERT_STYLE_KEYS = {"expert_parallel": set()}  # [experts] section (expert_parallel.py)
SECTIONS = {"modules": STYLE_KEYS, "experts": EXPERT_STYLE_KEYS}


@dataclass(frozen=True)
class Rule:
    glob: str
    style: str
    options: dict = field(default_factory=dict)
    section: str = "modules"  # "modules": tensor parallel; "experts": expert parallel
    optional: bool = False  # may match no module of the model

    def matches(self, name: str) -> bool:
        pattern, parts = self.glob.split("."), name.split(".")
        return len(pattern) == len(parts) and all(map(fnmatch.fnmatchcase, parts, pattern))


def plan_path(plan: str, sequence_parallel: bool, moe: bool = False) -> Path:
    """parallel.plan -> the file: "" = the default for (no) sequence parallelism (and a MoE
    model), a bare name = a plan shipped in gpt3d/plans, anything else = a path."""
    defaults = (DEFAULT_MOE_PLAN, DEFAULT_MOE_SP_PLAN) if moe else (DEFAULT_PLAN, DEFAULT_SP_PLAN)
    plan = plan or defaults[sequence_parallel]
    if "/" not in plan and not plan.endswith(".toml"):
        shipped = sorted(p.stem for p in PLANS_DIR.glob("*.toml"))
        if plan not in shipped:
            raise PlanError(
                f"parallel.plan={plan!r} is not a shipped plan ({shipped}) nor a "
                "path to a .toml file"
            )
        return PLANS_DIR / f"{plan}.toml"
    return Path(plan)


def load_plan(path: str | Path) -> list[Rule]:
    """Read and check a plan file's syntax (styles, keys, layouts)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(
            f"plan file {str(path)!r} not found (from {Path.cwd()}); set parallel.plan to an "
            "existing file or a shipped plan name (gpt_tp, gpt_tp_sp)"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"plan file {path} is not valid TOML: {e}") from e
    unknown = set(data) - {*SECTIONS, "description"}
    tables = [s for s in SECTIONS if isinstance(data.get(s), dict)]
    if unknown or not tables:
        raise PlanError(
            f'plan file {path}: expected [modules."<glob>"] / [experts."<glob>"] tables (and '
            f"an optional description), found {sorted(unknown) or 'no such table'}"
        )
    return [_parse_rule(path, s, glob, entry) for s in tables for glob, entry in data[s].items()]


def _parse_rule(path: Path, section: str, glob: str, entry) -> Rule:
    where, styles = f'plan file {path}, entry [{section}."{glob}"]', SECTIONS[section]
    if not isinstance(entry, dict) or "style" not in entry:
        raise PlanError(f"{where}: needs style = one of {sorted(styles)}")
    style = entry["style"]
    if style not in styles:
        close = difflib.get_close_matches(str(style), styles, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PlanError(f"{where}: unknown style {style!r}{hint}; use one of {sorted(styles)}")
    options = {k: v for k, v in entry.items() if k not in ("style", "optional")}
    bad = set(options) - styles[style]
    if bad:
        raise PlanError(f"{where}: style {style} takes {sorted(styles[style])}, not {sorted(bad)}")
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        raise PlanError(f"{where}: optional = {optional!r} must be true or false")
    for key, value in options.items():
        if key.endswith("layouts"):
            values = value if isinstance(value, list) else [value]
            for v in values:
                if not isinstance(v, str) or not LAYOUT_RE.match(v):
                    raise PlanError(
                        f"{where}: {key} = {value!r}: layouts are 'replicate' or 'shard(<dim>)'"
                    )
    return Rule(glob, style, options, section, optional)


def check_plan_matches(rules: list[Rule], module_names: list[str], path) -> None:
    """Every glob must match at least one module of the full model."""
    for rule in rules:
        if not rule.optional and not any(rule.matches(n) for n in module_names):
            literal = rule.glob.replace("*", "0")
            close = difflib.get_close_matches(literal, module_names, n=3, cutoff=0.5)
            raise PlanError(
                f"plan file {path}: glob {rule.glob!r} matches no module of the model; "
                f"closest module names: {close or sorted(module_names)[:5]}"
            )


def load_checked_plan(plan: str, sequence_parallel: bool, module_names: list[str]) -> list[Rule]:
    """parallel.plan -> rules, syntax-checked and with every glob matching a module name."""
    path = plan_path(plan, sequence_parallel)
    rules = load_plan(path)
    check_plan_matches(rules, module_names, path)
    return rules


def apply_tensor_parallel(model: nn.Module, tp_mesh, rules: list[Rule], loss_parallel: bool):
    """parallelize_module with this stage's entries of the plan, then re-tie wte/lm_head
    (parallelize_module replaces both parameters, silently untying them)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = plan_for(rules, model, loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    retie_embeddings(model)


def retie_embeddings(model: nn.Module) -> None:
    """Point lm_head.weight back at wte.weight when the model ties them and holds both."""
    both = model.wte is not None and model.lm_head is not None
    if model.config.tie_embeddings and both and model.lm_head.weight is not model.wte.weight:
        model.lm_head.weight = model.wte.weight


def plan_for(rules: list[Rule], model: nn.Module, loss_parallel: bool) -> dict:
    """{module fqn: ParallelStyle} for the modules this (stage) model holds."""
    plan = {}
    for name, module in model.named_modules():
        for rule in rules:
            if name and rule.section == "modules" and rule.matches(name):
                plan[name] = build_style(
                    rule,
                    gather_logits=(name == "lm_head" and not loss_parallel),
                    embedding=isinstance(module, nn.Embedding),
                )
    return plan


def build_style(rule: Rule, gather_logits: bool = False, embedding: bool = False):
    """A fresh torch ParallelStyle for one module.

    gather_logits: loss parallel is off, so the logits leave lm_head replicated and local.
    embedding: the module is an nn.Embedding; "rowwise" then means gpt3d's
    VocabParallelEmbedding (the same placements, the work on the local rows only)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    classes = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "sequence_parallel": SequenceParallel,
        "prepare_module_input": PrepareModuleInput,
        "prepare_module_output": PrepareModuleOutput,
    }
    if embedding:
        from gpt3d.parallel.vocab_parallel import VocabParallelEmbedding

        classes["rowwise"] = VocabParallelEmbedding
    as_tuple = rule.style.startswith("prepare_")  # PrepareModule* take one layout per arg
    kwargs = {k: _convert(v, as_tuple) for k, v in rule.options.items()}
    if gather_logits:
        kwargs.update(output_layouts=_layout("replicate"), use_local_output=True)
    return classes[rule.style](**kwargs)


def _convert(value, as_tuple: bool):
    if isinstance(value, bool | int):
        return value
    if isinstance(value, list):
        return tuple(_layout(v) for v in value)
    return (_layout(value),) if as_tuple else _layout(value)


def _layout(text: str):
    from torch.distributed.tensor import Replicate, Shard

    m = LAYOUT_RE.match(text)
    return Replicate() if m.group(2) is None else Shard(int(m.group(2)))
