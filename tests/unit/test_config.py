"""gpt3d.config: defaults, recipe files, overrides, errors, help, round trips."""

import dataclasses
from pathlib import Path

import pytest

from gpt3d.config import (
    SECTIONS,
    Config,
    ConfigError,
    check_fields,
    config_to_dict,
    gpt_config,
    help_text,
    load_config,
)
from gpt3d.errors import UserError
from gpt3d.model import PRESETS
from tests.error_cases import FIELD_ERRORS
from tests.helpers import REPO

RECIPES = sorted((REPO / "recipes" / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return str(path)


def test_defaults_load_and_match_dataclass_defaults():
    cfg = load_config([])
    assert cfg == Config()
    assert cfg.job.name == "gpt3d" and cfg.model.preset == "mini"
    assert cfg.parallel.dp_shard == -1 and cfg.parallel.pp_layer_split == []
    assert cfg.training.steps == 200 and cfg.training.lr == 1e-3


def test_recipe_files_exist():
    names = {p.name for p in RECIPES}
    expected = {"debug.toml", "shakespeare.toml", "tp2.toml", "tp2_pp2.toml", "dp2_pp2_tp2.toml"}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(path):
    cfg = load_config(["--config", str(path)])
    assert cfg.training.seq_len <= gpt_config(cfg.model).block_size


def test_recipe_layouts():
    layout = {}
    for p in RECIPES:
        c = load_config(["--config", str(p)]).parallel
        layout[p.stem] = (c.dp_shard, c.pp, c.tp)
    assert layout["tp2"] == (1, 1, 2)
    assert layout["tp2_pp2"] == (1, 2, 2)
    assert layout["dp2_pp2_tp2"] == (2, 2, 2)


def test_parallel_recipes_share_the_shakespeare_model():
    base = load_config(["--config", str(REPO / "recipes/configs/shakespeare.toml")])
    for name in ("tp2", "tp2_pp2", "dp2_pp2_tp2"):
        cfg = load_config(["--config", str(REPO / f"recipes/configs/{name}.toml")])
        assert cfg.model == base.model and cfg.data == base.data
        assert cfg.training == base.training


@pytest.mark.parametrize(
    "arg, section, key, value",
    [
        ("--training.steps=7", "training", "steps", 7),
        ("--training.lr=3e-4", "training", "lr", 3e-4),
        ("--training.lr=1", "training", "lr", 1.0),
        ("--training.compile=yes", "training", "compile", True),
        ("--model.bias=0", "model", "bias", False),
        ("--metrics.plot=False", "metrics", "plot", False),
        ("--job.name=hello world", "job", "name", "hello world"),
        ("--parallel.pp_layer_split=1,3", "parallel", "pp_layer_split", [1, 3]),
        ("--parallel.pp_layer_split=[3, 1]", "parallel", "pp_layer_split", [3, 1]),
        ("--parallel.pp_layer_split=", "parallel", "pp_layer_split", []),
        ("--parallel.dp_shard=-1", "parallel", "dp_shard", -1),
        ("--training.global-batch-size=32", "training", "global_batch_size", 32),
    ],
)
def test_override_types(arg, section, key, value):
    got = getattr(getattr(load_config([arg]), section), key)
    assert got == value and type(got) is type(value)


def test_override_space_separated_and_bare_flag():
    cfg = load_config(["--training.steps", "9", "--training.compile", "--job.seed", "-3"])
    assert cfg.training.steps == 9 and cfg.training.compile is True and cfg.job.seed == -3


def test_cli_beats_file_regardless_of_position(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 11\nlr = 2e-3\n")
    cfg = load_config(["--training.steps=5", "--config", path])
    assert cfg.training.steps == 5  # CLI wins even when given first
    assert cfg.training.lr == 2e-3  # file value kept where the CLI is silent
    assert cfg.training.seq_len == 128  # default kept where both are silent


def test_partial_file_and_int_for_float(tmp_path):
    cfg = load_config(["--config", write(tmp_path, "[metrics]\npeak_tflops = 100\n")])
    assert cfg.metrics.peak_tflops == 100.0 and isinstance(cfg.metrics.peak_tflops, float)
    assert cfg.training == Config().training


def test_pp_schedule_case_insensitive():
    cfg = load_config(["--parallel.pp_schedule=interleaved1f1b"])
    assert cfg.parallel.pp_schedule == "Interleaved1F1B"
    assert load_config(["--parallel.pp_schedule=gpipe"]).parallel.pp_schedule == "GPipe"


@pytest.mark.parametrize("case", list(FIELD_ERRORS))
def test_cli_errors(case):
    argv, needle = FIELD_ERRORS[case]
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


TOML_ERRORS = [
    ("unknown section", "[trainig]\nsteps = 1\n", "trainig"),
    ("empty unknown section", "[nope]\n", "nope"),
    ("unknown key", "[training]\nsetps = 1\n", "setps"),
    ("key outside section", "steps = 1\n", "[training]"),
    ("section not a table", "training = 1\n", "training"),
    ("str for int", '[training]\nsteps = "100"\n', "training.steps"),
    ("bool for int", "[training]\nsteps = true\n", "training.steps"),
    ("float for int", "[training]\nsteps = 1.0\n", "training.steps"),
    ("int for bool", "[training]\ncompile = 1\n", "training.compile"),
    ("int for str", "[job]\nname = 1\n", "job.name"),
    ("str for float", '[training]\nlr = "1e-3"\n', "training.lr"),
    ("bad list", '[parallel]\npp_layer_split = ["2", "2"]\n', "parallel.pp_layer_split"),
    ("table for int", "[training.steps]\nx = 1\n", "training.steps"),
    ("malformed", "[training\nsteps = 1\n", "malformed TOML"),
]


@pytest.mark.parametrize(
    "text, needle", [c[1:] for c in TOML_ERRORS], ids=[c[0] for c in TOML_ERRORS]
)
def test_toml_errors(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", path])
    assert needle in str(e.value)


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError) and issubclass(UserError, ValueError)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_zero_and_lists_everything(flag, capsys):
    with pytest.raises(SystemExit) as e:
        load_config([flag, "--training.steps=oops"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.strip() == help_text().strip()
    for section, cls in SECTIONS.items():
        assert f"[{section}]" in out
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name} " in out
            assert f.metadata["help"].split()[0] in out


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        assert cls.__doc__
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def test_config_to_dict_is_plain_and_a_copy():
    cfg = load_config(["--parallel.pp_layer_split=1,3", '--job.name=ünïcode "quoted"'])
    d = config_to_dict(cfg)
    assert set(d) == set(SECTIONS) and d["job"]["name"] == 'ünïcode "quoted"'
    d["parallel"]["pp_layer_split"].append(9)  # the dict is a copy
    assert cfg.parallel.pp_layer_split == [1, 3]


def test_check_fields_catches_programmatic_mistakes():
    cfg = Config()
    cfg.training.steps = "5"
    with pytest.raises(ConfigError, match="training.steps"):
        check_fields(cfg)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gpt_config_preset(preset):
    cfg = Config()
    cfg.model.preset = preset
    assert gpt_config(cfg.model) == PRESETS[preset]


def test_gpt_config_overrides():
    cfg = load_config(
        [
            "--model.preset=tiny",
            "--model.n_layer=3",
            "--model.n_embd=96",
            "--model.pad_vocab_multiple=64",
            "--model.dropout=0.1",
            "--model.tie_embeddings=false",
            "--training.seq_len=64",
        ]
    )
    g = gpt_config(cfg.model)
    assert (g.n_layer, g.n_head, g.n_embd, g.block_size) == (3, 2, 96, 128)
    assert g.vocab_size == PRESETS["tiny"].vocab_size and g.padded_vocab_size == 50304
    assert g.dropout == 0.1 and g.tie_embeddings is False and g.bias is True
