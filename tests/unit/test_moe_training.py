"""A Mixture-of-Experts model trained by gpt3d's Trainer in one process: the balancing bias
update after each step, the aux loss scaled by the global batch, evaluation leaving the
balance alone, checkpoints carrying the biases, per-step MoE metrics, MFU on active
parameters, and the export / sampling path (Mixtral-style safetensors)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from gpt3d.errors import CheckpointError
from gpt3d.generate import load_plain_model
from gpt3d.metrics import flops_per_token
from gpt3d.model import GPT, count_params_formula, preset_config
from gpt3d.moe import frozen_moe_stats, moe_layers
from tests.helpers import (
    make_dataset,
    model_args,
    read_jsonl,
    recipe,
    trainer_for,
    trainer_with_checkpointer,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
MOE = [
    *model_args(2, 2, 32),
    "--model.n_experts=4",
    "--model.moe_top_k=2",
    "--training.seq_len=16",
    "--training.global_batch_size=8",
    "--training.eval_interval=0",
    "--training.warmup_steps=1",
    "--metrics.plot=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=6000, n_val=1000)


def args(data, *extra, steps=3):
    return [f"--data.dataset={data}", *MOE, f"--training.steps={steps}", *extra]


def biases(trainer) -> list[torch.Tensor]:
    return [m.expert_bias.clone() for m in moe_layers(trainer.parts.chunks[0]).values()]


def test_bias_update_uses_the_steps_token_counts_then_resets_them(data):
    trainer = trainer_for(args(data, "--model.moe_bias_rate=0.01"))
    model = trainer.parts.chunks[0]
    # The counts of step 1, from a forward of the same batch with the initial weights.
    reference = GPT(trainer.model_cfg).train()
    reference.init_weights(trainer.cfg.job.seed)
    x, _, _ = trainer.loader.batch_at(0)
    reference(x)
    counts = [m.tokens_per_expert.float() for m in moe_layers(reference).values()]
    stats = trainer.train_step()
    for bias, c in zip(biases(trainer), counts, strict=True):
        step = 0.01 * torch.sign(c.mean() - c)
        torch.testing.assert_close(bias, step - step.mean(), atol=0, rtol=0)
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in moe_layers(model).values())
    assert stats.moe["moe_bias_spread"] == pytest.approx(
        max(float(b.max() - b.min()) for b in biases(trainer))
    )
    loads = [float(c.max() / c.mean()) for c in counts]
    assert stats.moe["moe_load_max"] == pytest.approx(max(loads))
    assert stats.moe["moe_load_mean"] == pytest.approx(sum(loads) / len(loads))


def test_no_bias_rate_keeps_biases_zero_and_no_aux_coef_reports_zero(data):
    trainer = trainer_for(args(data, "--model.moe_bias_rate=0", "--model.moe_aux_coef=0"))
    for _ in range(2):
        stats = trainer.train_step()
    assert all(torch.count_nonzero(b) == 0 for b in biases(trainer))
    assert stats.moe["moe_aux_loss"] == 0.0 and stats.moe["moe_bias_spread"] == 0.0


def test_aux_loss_is_scaled_by_the_global_batch_so_grad_accum_changes_nothing(data):
    """Each microbatch's aux loss is divided by the global sequence count; with the layer's
    default (its own sequences) two microbatches would double the aux gradient."""
    runs = {}
    for accum in (1, 2):
        trainer = trainer_for(
            args(data, "--model.moe_aux_coef=0.5", f"--training.grad_accum={accum}")
        )
        stats = [trainer.train_step() for _ in range(3)]
        params = {n: p.detach().clone() for n, p in trainer.parts.chunks[0].named_parameters()}
        runs[accum] = (stats, params)
    (one, p1), (two, p2) = runs[1], runs[2]
    assert one[0].moe["moe_aux_loss"] > 0.4  # ~coef x layers x ~1 summed, well above 0
    for a, b in zip(one, two, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-6)
        assert a.moe["moe_aux_loss"] == pytest.approx(b.moe["moe_aux_loss"], rel=1e-6)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], atol=1e-6, rtol=0, msg=name)


def test_evaluation_neither_counts_tokens_nor_moves_biases(data):
    trainer = trainer_for(args(data, "--training.eval_interval=1", "--training.eval_steps=2"))
    trainer.train_step()
    before = biases(trainer)
    trainer.evaluate()
    model = trainer.parts.chunks[0]
    assert all(int(m.tokens_per_expert.sum()) == 0 for m in moe_layers(model).values())
    for a, b in zip(before, biases(trainer), strict=True):
        assert torch.equal(a, b)


def test_frozen_moe_stats_restores_counts_and_aux():
    cfg = preset_config("tiny", vocab_size=64, block_size=16, n_experts=4, moe_aux_coef=0.1)
    model = GPT(cfg).train()
    model.init_weights(0)
    x = torch.randint(0, 64, (2, 16))
    model(x)
    saved = [(m.tokens_per_expert.clone(), m.aux_loss.clone()) for m in moe_layers(model).values()]
    with frozen_moe_stats(model):
        model(x)
        assert int(next(iter(moe_layers(model).values())).tokens_per_expert.sum()) == 2 * 2 * 16 * 2
    for m, (tokens, aux) in zip(moe_layers(model).values(), saved, strict=True):
        assert torch.equal(m.tokens_per_expert, tokens) and torch.equal(m.aux_loss, aux)


def test_checkpoint_carries_biases_and_resume_continues_exactly(data, tmp_path):
    out = tmp_path / "run"
    run = args(data, f"--job.output_dir={out}", "--checkpoint.interval=2", steps=4)
    trainer, ckpt = trainer_with_checkpointer(run)
    losses = []
    for _ in range(4):
        losses.append(trainer.train_step().loss)
        ckpt.maybe_save()
    final = biases(trainer)
    assert any(torch.count_nonzero(b) for b in final)
    # A different bias rate / aux coefficient is a training knob, not a different model.
    knobs = ["--model.moe_aux_coef=0.01", "--model.moe_bias_rate=0.1", "--model.moe_impl=loop"]
    assert trainer_with_checkpointer([*run, "--checkpoint.resume=auto", *knobs])[0].step == 4
    resumed, _ = trainer_with_checkpointer(
        [*run, f"--checkpoint.resume={out / 'checkpoints' / 'step-2'}"]
    )
    assert resumed.step == 2
    assert [resumed.train_step().loss for _ in range(2)] == losses[2:]
    for a, b in zip(final, biases(resumed), strict=True):
        assert torch.equal(a, b)


def test_metrics_log_and_jsonl_carry_moe_balance(data, tmp_path, capsys):
    out = tmp_path / "run"
    run = args(
        data,
        f"--job.output_dir={out}",
        "--training.log_interval=1",
        "--checkpoint.save_final=false",
    )
    assert recipe("train")(run) == 0
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3
    for key in ("moe_load_max", "moe_load_mean", "moe_bias_spread", "moe_aux_loss"):
        assert all(key in r for r in records), key
    assert records[-1]["moe_bias_spread"] > 0 and records[0]["moe_load_max"] >= 1.0
    assert "| load " in capsys.readouterr().out


def test_mfu_counts_active_parameters():
    moe = preset_config("moe-mini")
    dense = preset_config("mini")
    # top-2 of 8 experts of width 4C/2: the dense MLP's matmul FLOPs, plus the router (E x C),
    # minus the MLP's biases (5C: experts have none)
    extra = 6 * moe.n_layer * (moe.n_experts - 5) * moe.n_embd
    assert flops_per_token(moe, 128) == flops_per_token(dense, 128) + extra
    assert count_params_formula(moe) > count_params_formula(moe, active=True)


# ---- export and sampling -----------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_checkpoint(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_run")
    run = args(data, f"--job.output_dir={out}", "--model.moe_every=2", "--model.n_layer=4", steps=2)
    trainer, ckpt = trainer_with_checkpointer(run)
    trainer.train_step(), trainer.train_step()
    ckpt.finish()
    return out / "checkpoints" / "step-2"


def test_export_writes_mixtral_style_names_and_loads_back_exactly(moe_checkpoint, tmp_path):
    hf = tmp_path / "hf"
    assert recipe("export")(["--checkpoint", str(moe_checkpoint), "--out", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "gpt3d_moe"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    with safe_open(hf / "model.safetensors", "pt") as f:
        names = set(f.keys())  # noqa: SIM118
    moe = "model.layers.1.block_sparse_moe"
    assert {f"{moe}.gate.weight", f"{moe}.gate.e_score_correction_bias"} <= names
    assert {f"{moe}.experts.{j}.{w}.weight" for j in range(4) for w in ("w1", "w2")} <= names
    assert "model.layers.0.mlp.fc1.weight" in names  # block 0 is dense (moe_every=2)
    assert "model.layers.0.self_attn.o_proj.bias" in names and "lm_head.weight" not in names
    model = load_plain_model(moe_checkpoint)
    exported = load_plain_model(hf)
    for (n, a), (m, b) in zip(
        model.state_dict().items(), exported.state_dict().items(), strict=True
    ):
        assert n == m and torch.equal(a, b), n
    assert torch.count_nonzero(exported.h["1"].moe.expert_bias) > 0  # the trained balance


def test_exported_experts_compute_the_layer_by_their_names(moe_checkpoint, tmp_path):
    """Another reader needs only the documented names and shapes: a MoE layer recomputed
    from the safetensors file, Mixtral-style (per expert nn.Linear (out, in) weights),
    equals gpt3d's layer."""
    hf = tmp_path / "hf"
    recipe("export")(["--checkpoint", str(moe_checkpoint), "--out", str(hf)])
    with safe_open(hf / "model.safetensors", "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if ".layers.1.block_sparse_moe" in k}  # noqa: SIM118
    p = "model.layers.1.block_sparse_moe"
    x = torch.randn(10, 32)
    probs = F.softmax(x @ t[f"{p}.gate.weight"].T, dim=-1)  # (N, E)
    chosen = torch.topk(probs + t[f"{p}.gate.e_score_correction_bias"], 2).indices
    y = torch.zeros_like(x)
    for n in range(10):
        for e in chosen[n].tolist():
            h = F.gelu(x[n] @ t[f"{p}.experts.{e}.w1.weight"].T, approximate="tanh")
            y[n] += probs[n, e] * (h @ t[f"{p}.experts.{e}.w2.weight"].T)
    layer = load_plain_model(moe_checkpoint).h["1"].moe
    torch.testing.assert_close(layer(x.view(1, 10, 32)).view(10, 32), y, atol=1e-6, rtol=1e-5)


def test_export_in_bf16_keeps_the_balancing_bias_fp32(moe_checkpoint, tmp_path):
    hf = tmp_path / "hf"
    recipe("export")(["--checkpoint", str(moe_checkpoint), "--out", str(hf), "--dtype", "bfloat16"])
    with safe_open(hf / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.block_sparse_moe.gate.weight").dtype == torch.bfloat16
        bias = f.get_tensor("model.layers.1.block_sparse_moe.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32


def test_sample_same_text_from_moe_checkpoint_and_export(moe_checkpoint, tmp_path, capsys):
    hf = tmp_path / "hf"
    recipe("export")(["--checkpoint", str(moe_checkpoint), "--out", str(hf)])
    capsys.readouterr()
    texts = []
    for source in (moe_checkpoint, hf):
        argv = ["--checkpoint", str(source), "--prompt", "a", "--max_new_tokens", "12"]
        assert recipe("sample")(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0].strip()) > 0


def test_gpt2_export_refuses_a_moe_model():
    from gpt3d.hf import save_hf

    cfg = preset_config("tiny", vocab_size=64, block_size=16, n_experts=4)
    with pytest.raises(CheckpointError, match="Mixtral-style"):
        save_hf("/nonexistent", GPT(cfg).state_dict(), cfg)
