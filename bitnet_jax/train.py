"""The training loop: wires config, tokenizer, data, model, optimizer and hooks together.

``python train.py --config configs/tiny.yaml [--set k=v]... [--run-id ID] [--runs-dir DIR] [--dry-run]``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from bitnet_jax import config as config_lib
from bitnet_jax.config import Config, ConfigError


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a BitNet b1.58 language model.")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable; values are YAML scalars")
    p.add_argument("--run-id", help="run folder name (default: <name>_T<tokens>_<unix time>)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model abstractly, print its size and cost, and exit")
    return p.parse_args(argv)


def format_count(n: float) -> str:
    """1_966_080_000 -> '1.97B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(int(n))


def default_run_id(cfg: Config) -> str:
    return f"{cfg.name}_T{format_count(cfg.total_tokens)}_{int(time.time())}"


# --------------------------------------------------------------------------- dry run

def memory_estimate_bytes(cfg: Config) -> dict[str, float]:
    """Rough device memory of training: float32 params, grads and two Adam moments (16 B/param),
    plus activations kept for the backward pass (Korthikanti et al. 2022, ``s b h (34 + 5 a s / h)``
    bytes per layer in 16-bit, doubled for float32 compute)."""
    from bitnet_jax.model import count_params

    m, t = cfg.model, cfg.train
    n = count_params(m)
    micro = t.batch_size // t.grad_accum
    per_layer = t.seq_len * micro * m.hidden_size * (34 + 5 * m.num_attention_heads * t.seq_len / m.hidden_size)
    scale = 1.0 if m.compute_dtype == "bfloat16" else 2.0
    activations = per_layer * m.num_hidden_layers * scale + micro * t.seq_len * m.vocab_size * 4 * 2  # + logits
    return {"state": 16.0 * n, "activations": activations, "total": 16.0 * n + activations}


def dry_run(cfg: Config) -> None:
    import jax

    from bitnet_jax.model import count_params, flops_per_token
    from bitnet_jax.train_state import abstract_state

    _, state = abstract_state(cfg)  # builds the model abstractly: no allocation, no data
    n = sum(x.size for x in jax.tree.leaves(state.params))
    assert n == count_params(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.train.seq_len)
    mem = memory_estimate_bytes(cfg)
    print(f"config:            {cfg.name}")
    print(f"parameters:        {n:,} ({format_count(n)})")
    print(f"FLOPs per token:   {fpt / 1e6:,.1f} MFLOP (6N + 12 L d T)")
    print(f"tokens per step:   {cfg.tokens_per_step:,} ({cfg.train.batch_size} x {cfg.train.seq_len})")
    print(f"total tokens:      {cfg.total_tokens:,} ({format_count(cfg.total_tokens)}) over {cfg.train.steps:,} steps")
    print(f"total compute:     {fpt * cfg.total_tokens:.3g} FLOPs")
    print(f"stage switch:      step {cfg.stage_switch:,}")
    print(f"device memory:     ~{mem['total'] / 2**30:.2f} GiB (state {mem['state'] / 2**30:.2f} GiB "
          f"+ activations {mem['activations'] / 2**30:.2f} GiB, estimate)")


# --------------------------------------------------------------------------- the run

@dataclasses.dataclass
class RunPaths:
    root: Path

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


def prepare_run_dir(cfg: Config, runs_dir: str, run_id: str | None) -> RunPaths:
    root = Path(runs_dir) / (run_id or default_run_id(cfg))
    paths = RunPaths(root.resolve())
    if paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir()):
        raise ConfigError(
            f"{paths.root} already holds checkpoints; pass --resume latest to continue it, or another --run-id"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(config_lib.dump(cfg))
    return paths


def train(cfg: Config, paths: RunPaths) -> dict:
    """Runs the whole training; returns a summary (first and last loss, eval loss, throughput)."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from bitnet_jax import sharding, train_state
    from bitnet_jax.data import build_eval_batches, build_train_loader, load_tokenizer, write_fingerprint
    from bitnet_jax.evaluation import Evaluator, eval_scalars
    from bitnet_jax.hooks import Hook, run_due_hooks
    from bitnet_jax.metrics import StepMetrics, TensorBoard, device_peak_flops
    from bitnet_jax.model import flops_per_token

    # Tokenizer: check it fits the model before any compute, keep a copy with the run.
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}; set --set model.vocab_size={tokenizer.vocab_size}")
    tokenizer.save(paths.tokenizer)

    # Model, optimizer state and the jitted steps, laid out on the mesh.
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, state = train_state.init_state(cfg)
    state, state_sharding = train_state.place_state(state, mesh)
    train_step = train_state.make_train_step(cfg, graphdef, mesh, state_sharding)
    eval_step = train_state.make_eval_step(graphdef, mesh, state_sharding.params)

    # Data: this process's shard of every global batch; fixed held-out batches for evaluation.
    pi, pc = jax.process_index(), jax.process_count()
    write_fingerprint(paths.root / "dataset_fingerprint.json", cfg, tokenizer)
    loader = build_train_loader(cfg, tokenizer, process_index=pi, process_count=pc)
    evaluator = Evaluator(eval_step, build_eval_batches(cfg, tokenizer, pi, pc), mesh)

    tb = TensorBoard(paths.tb, enabled=pi == 0)
    total = cfg.train.steps
    show_progress = cfg.log.progress and pi == 0
    progress = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, disable=not show_progress,
                    mininterval=1.0)
    peak = cfg.log.peak_flops or device_peak_flops()
    metrics = StepMetrics(tb, tokens_per_step=cfg.tokens_per_step,
                          flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                          peak_flops_total=peak * jax.device_count() if peak else None, progress=progress)

    summary = {"eval_loss": None, "first_loss": None}
    last_eval = {"step": 0}

    def evaluate(step: int) -> None:
        loss = evaluator(state.params)
        tb.scalars(step, eval_scalars(loss, metrics.mean_loss_since(last_eval["step"])))
        last_eval["step"] = step
        summary["eval_loss"] = loss

    hooks = [Hook("eval", cfg.eval.every, evaluate, timing_tag="time/eval_ms")]

    step = int(jax.device_get(state.step))
    metrics.start_clock()
    try:
        while step < total:
            batch = sharding.global_batch(next(loader), mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            metrics.push(step, step_metrics)
            if any(h.due(step, total) for h in hooks):
                metrics.flush()  # hooks read the latest values; the device syncs here anyway
                mark = metrics.pause_clock()
                run_due_hooks(hooks, step, total, on_time=lambda tag, ms, s=step: tb.scalars(s, {tag: ms}))
                metrics.resume_clock(mark)
            if summary["first_loss"] is None and metrics.losses:
                summary["first_loss"] = metrics.losses[0][1]
        metrics.flush()
    finally:
        progress.close()
        loader.close()
        tb.close()
    summary.update(final_loss=metrics.last.get("loss"), step=step,
                   median_step_ms=metrics.median_step_ms(), tokens_per_step=cfg.tokens_per_step)
    return summary


def print_summary(paths: RunPaths, summary: dict) -> None:
    first, last = summary.get("first_loss"), summary.get("final_loss")
    print()
    if first is not None and last is not None:
        drop = 100.0 * (1 - last / first)
        print(f"train loss: {first:.4f} (first step) -> {last:.4f} (step {summary['step']}), {drop:.1f}% lower")
    if summary.get("eval_loss") is not None:
        print(f"eval loss:  {summary['eval_loss']:.4f} (perplexity {math.exp(summary['eval_loss']):.1f})")
    if summary.get("median_step_ms"):
        tps = summary["tokens_per_step"] / (summary["median_step_ms"] / 1e3)
        print(f"speed:      {summary['median_step_ms']:.1f} ms/step, {tps:,.0f} tokens/s (median)")
    print(f"run directory: {paths.root}")
    print(f"watch it:      tensorboard --logdir {paths.tb}   or   python status.py {paths.root}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg)
            return 0
        paths = prepare_run_dir(cfg, args.runs_dir, args.run_id)
        summary = train(cfg, paths)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(paths, summary)
    return 0
