"""recipes/export.py and recipes/sample.py on real checkpoints, and the full GPT-2 (124M)
shape through Hugging Face -> gpt3d training -> DCP -> Hugging Face with transformers."""

from __future__ import annotations

import time

import pytest
import torch

from gpt3d.checkpoint_dir import load_model_state_dict
from gpt3d.config import load_config
from gpt3d.data import ShardedLoader
from gpt3d.errors import UserError
from gpt3d.generate import generate, load_plain_model
from gpt3d.model import GPT, GPTConfig
from gpt3d.preflight import preflight
from tests.helpers import (
    make_dataset,
    read_jsonl,
    recipe,
    run_script,
    small_run,
    trainer_with_checkpointer,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SMALL = small_run(steps=2, vocab=50257)


@pytest.fixture(scope="module")
def gpt2_vocab_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), vocab_size=50257, n_train=8000)


def trained_checkpoint(data, out, *args):
    """Two steps in this process, then a checkpoint: its step-2 directory."""
    run_args = [*SMALL, f"--data.dataset={data}", f"--job.output_dir={out}", *args]
    trainer, ckpt = trainer_with_checkpointer(run_args)
    trainer.train_step(), trainer.train_step()
    ckpt.finish()
    return out / "checkpoints" / "step-2"


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_in_transformers(gpt2_vocab_data, tmp_path, tied):
    # padded vocab (50257 -> 50304 rows) and an untied head: both must map back exactly
    args = ["--model.pad_vocab_multiple=64", f"--model.tie_embeddings={tied}"]
    ckpt = trained_checkpoint(gpt2_vocab_data, tmp_path / "run", *args)
    assert (
        recipe("export")(
            [
                "--checkpoint",
                "auto",
                "--output_dir",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "hf"),
            ]
        )
        == 0
    )
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_plain_model(ckpt)
    x = torch.randint(50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[..., :50257]).abs().max().item()
    assert diff < 1e-4


def test_sample_same_text_from_checkpoint_and_export(gpt2_vocab_data, tmp_path, capsys):
    ckpt = trained_checkpoint(gpt2_vocab_data, tmp_path / "run")
    recipe("export")(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])
    sample = recipe("sample")
    texts = []
    for source in (ckpt, tmp_path / "hf"):
        capsys.readouterr()
        argv = ["--checkpoint", str(source), "--prompt", "ROMEO:", "--max_new_tokens", "8"]
        assert sample([*argv, "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:")
    with pytest.raises(UserError, match="no complete checkpoint"):
        sample(["--checkpoint", "auto", "--output_dir", str(tmp_path / "empty")])


def test_generate_greedy_is_top_k_1_and_never_samples_padding():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50, pad_vocab_multiple=64
        )
    ).eval()
    model.init_weights(0)
    prompt = torch.zeros(3, 2, dtype=torch.long)
    greedy = generate(model, prompt, 12, temperature=0)  # longer than block_size: crops
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 12, 1.0, top_k=1, generator=gen), greedy)
    hot = generate(model, prompt, 40, temperature=5.0, generator=gen)
    assert hot.shape == (3, 42) and hot.max() < 50


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpt2_124m_round_trip(tmp_path, gpt2_vocab_data):
    """HF gpt2-shaped random model -> init_from (train 1 step, DCP) -> export -> transformers."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random
    hf.save_pretrained(tmp_path / "gpt2")
    run = [f"--job.output_dir={tmp_path / 'run'}", f"--data.dataset={gpt2_vocab_data}"]
    short = [
        "--training.steps=1",
        "--training.seq_len=64",
        "--training.global_batch_size=2",
        "--training.eval_interval=0",
        "--training.log_interval=1",
    ]
    args = [
        "--checkpoint.init_from",
        tmp_path / "gpt2",
        "--model.preset=gpt2",
        *run,
        *short,
        "--metrics.plot=false",
    ]
    proc = run_script("recipes/train.py", args, nproc=0, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 layers, 12 heads, n_embd 768, block_size 1024, vocab 50257" in proc.stdout
    # step 1's loss is the pretrained model's loss on batch 0: the import is exact
    x0, y0, _ = ShardedLoader(gpt2_vocab_data, "train", 64, 2, 1337).batch_for_step(0)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(hf(x0).logits.flatten(0, 1), y0.flatten())
    (step1,) = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert abs(step1 - ref.item()) < 1e-4
    del hf
    ckpt = tmp_path / "run" / "checkpoints" / "step-1"
    assert recipe("export")(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    cfg, sd = load_model_state_dict(ckpt)
    ours = GPT(cfg).eval()
    ours.load_state_dict(sd)
    with torch.no_grad():
        diff = (exported(x0).logits - ours(x0)[..., :50257]).abs().max().item()  # 50304 rows
    print(f"124M round trip: max |logits diff| {diff:.2e}, {time.perf_counter() - t0:.0f}s")
    assert diff < 1e-4


def test_init_from_takes_the_pretrained_shape_and_rejects_conflicts(tmp_path):
    data = make_dataset(tmp_path / "data", vocab_size=512, n_train=2000, n_val=500)

    def run_for(*args):
        return preflight(load_config(["--training.seq_len=32", f"--data.dataset={data}", *args]), 1)

    shape = dict(n_layer=3, n_head=2, n_embd=32, n_positions=32, vocab_size=512)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
    hf.save_pretrained(tmp_path / "hf")
    for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        run = run_for(f"--checkpoint.init_from={source}")
        weights, m = run.pretrained, run.config.model
        assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (3, 2, 32, 32, 512)
        c_attn = hf.transformer.h[1].attn.c_attn.weight  # Conv1D (C, 3C): q | k | v columns
        assert torch.equal(weights("h.1.attn.k_proj.weight", (32, 32)), c_attn[:, 32:64].T)
    with pytest.raises(UserError, match=r"model.n_layer=4 \(pretrained: 3\)"):
        run_for("--model.n_layer=4", f"--checkpoint.init_from={tmp_path / 'hf'}")
    with pytest.raises(UserError, match="does not exist"):
        run_for(f"--checkpoint.init_from={tmp_path / 'missing'}")
