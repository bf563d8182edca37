"""Sample from any checkpoint of any run, with the run's own tokenizer.

``python -m bitnet_jax.generate RUN_DIR [--step N] --prompt TEXT [--mode greedy|typical|stress]
[--max-new-tokens N] [--seed S]``

Prints the prompt followed by its continuation. Runs anywhere JAX runs (the checkpoint's arrays
are restored onto the default device); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitnet_jax.config import ConfigError
from bitnet_jax.generation import MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bitnet_jax.generate",
                                description="Continue a prompt with a saved BitNet checkpoint.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by train.py")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--mode", choices=list(MODES), default="greedy",
                   help="greedy (argmax), typical (temperature 0.9, top-p 0.95) or stress (temperature 1.5, "
                        "top-k 10); default greedy")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (typical/stress; default 0)")
    return p.parse_args(argv)


def generate_text(run_dir: str | Path, prompt: str, *, step: int | None = None, mode: str = "greedy",
                  max_new_tokens: int = 64, seed: int = 0) -> tuple[str, int]:
    """Returns (continuation, checkpoint step). Raises ConfigError (a CheckpointError for a bad
    checkpoint) with what to do when the run, step, tokenizer or prompt does not fit."""
    import jax

    from bitnet_jax.checkpoint import read_params
    from bitnet_jax.data.tokenizer import load_run_tokenizer
    from bitnet_jax.generation import Generator
    from bitnet_jax.model import abstract_model
    from bitnet_jax.open_step import open_step
    from bitnet_jax.samples import prompt_ids

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory; give a run directory made by train.py (runs/<run_id>)")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    opened = open_step(run_dir, step)  # the step's metadata only; its arrays are read last
    tokenizer = load_run_tokenizer(run_dir / "tokenizer")  # DataError is a ConfigError
    # The prompt must fit the model: checked from the stored config, before reading any arrays.
    model_cfg = opened.cfg.model
    ids = prompt_ids(tokenizer, prompt)
    graphdef, _ = abstract_model(model_cfg)
    generator = Generator(graphdef, max_positions=model_cfg.max_position_embeddings, eos_id=tokenizer.eos_id)
    try:
        generator.padded_length(len(ids), max_new_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _, params, loaded_step = opened.read(read_params)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), loaded_step)
    out = generator(params, ids, [MODES[mode]], max_new_tokens, key)
    return tokenizer.decode(out.tokens[0]), loaded_step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text, step = generate_text(args.run_dir, args.prompt, step=args.step, mode=args.mode,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[{args.run_dir} step {step}, {args.mode}]", file=sys.stderr)
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
