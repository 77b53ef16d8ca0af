"""Generate text from a trained gpt3d model: a DCP checkpoint (any layout) or a Hugging Face
GPT-2 export, in one process on the plain model.

    python recipes/sample.py --checkpoint out/shakespeare/checkpoints/step-120 --prompt "ROMEO:"
    python recipes/sample.py --checkpoint auto --output_dir out/shakespeare   # latest checkpoint
    python recipes/sample.py --checkpoint out/shakespeare/hf --temperature 0   # HF export, greedy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from gpt3d.launch import guarded_main  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = "step-N checkpoint, HF directory or .safetensors file, or auto"
    p.add_argument("--checkpoint", required=True, help=where)
    p.add_argument(
        "--output_dir", "--output-dir", default="out/shakespeare", help="the run's dir, for auto"
    )
    p.add_argument("--prompt", default="\n", help='start text (e.g. "ROMEO:")')
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=200, help="0 = no top-k filter")
    p.add_argument("--num_samples", "--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument(
        "--skip-checksums",
        action="store_true",
        help="do not check the checkpoint files' crc32 first (huge checkpoints; not safer)",
    )
    return p.parse_args(argv)


def sample(argv: list[str]) -> int:
    import torch

    from gpt3d.checkpoint_dir import find_checkpoint
    from gpt3d.errors import ConfigError
    from gpt3d.generate import generate, load_plain_model
    from gpt3d.tokenizer import EOT, get_tokenizer

    args = parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 0:
        raise ConfigError("--temperature and --max_new_tokens must be >= 0")
    path = find_checkpoint(args.checkpoint, args.output_dir)
    model = load_plain_model(path, checksums=not args.skip_checksums)
    enc = get_tokenizer()
    ids = enc.encode(args.prompt or EOT, allowed_special={EOT})
    if max(ids) >= model.config.vocab_size:
        vocab = model.config.vocab_size
        raise ConfigError(f"the prompt has token ids >= vocab_size {vocab}: not a GPT-2 BPE model")
    gen = torch.Generator().manual_seed(args.seed)
    prompt = torch.tensor([ids] * args.num_samples)  # (num_samples, T)
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, gen)
    for row in out.tolist():
        print(enc.decode(row))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    guarded_main(sample, sys.argv[1:])
