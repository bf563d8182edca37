"""The training loop: wires config, tokenizer, data, model, optimizer and hooks together.

``python train.py --config configs/tiny.yaml [--set k=v]... [--run-id ID] [--runs-dir DIR] [--dry-run] [--no-eval]``
``python train.py --resume latest|STEP|RUN_DIR|RUN_DIR/checkpoints/STEP [--run-id ID] [--stop-at STEP]``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from bitnet_jax import config as config_lib
from bitnet_jax import distributed
from bitnet_jax import resume as resume_lib
from bitnet_jax.checkpoint import complete_steps
from bitnet_jax.config import Config, ConfigError


# --------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description="Train a BitNet b1.58 language model.")
    p.add_argument("--config", help="YAML config file (see configs/); optional with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; repeatable; values are YAML scalars")
    p.add_argument("--run-id", help="run folder name (default: <name>_T<tokens>_<unix time>)")
    p.add_argument("--runs-dir", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model abstractly, print its size and cost, and exit")
    p.add_argument("--resume", metavar="latest|STEP|RUN_DIR|RUN_DIR/checkpoints/STEP",
                   help="continue a run: latest or STEP of --run-id, or a run directory; a step directory "
                        "starts a new run from it (see bitnet_jax/resume.py)")
    p.add_argument("--stop-at", type=int, metavar="STEP",
                   help="train up to STEP, save it and exit 0; the schedule stays that of train.steps")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (eval.every)")
    g = p.add_argument_group("several processes (hosts); see bitnet_jax/distributed.py")
    g.add_argument("--coordinator", metavar="HOST:PORT|auto",
                   help="process 0's address (env JAX_COORDINATOR_ADDRESS); auto: detect SLURM/MPI/k8s")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (env JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (env JAX_PROCESS_ID)")
    return p.parse_args(argv)


def format_count(n: float) -> str:
    """1_966_080_000 -> '1.97B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(int(n))


def default_run_id(cfg: Config, stamp: int | None = None) -> str:
    return f"{cfg.name}_T{format_count(cfg.total_tokens)}_{int(time.time()) if stamp is None else stamp}"


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
    if complete_steps(paths.root):  # refuse before writing anything
        raise ConfigError(
            f"{paths.root} already holds checkpoints; pass --resume {paths.root} to continue it "
            f"(or --resume latest --run-id {root.name}), or choose another --run-id"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(config_lib.dump(cfg))
    return paths


def train(cfg: Config, paths: RunPaths, resume: resume_lib.ResumePlan | None = None,
          stop_at: int | None = None, run_eval: bool = True) -> dict:
    """Runs the whole training (or continues ``resume``, up to ``stop_at``); returns a summary (first
    and last loss, eval loss, throughput, what stopped it)."""
    import jax
    from tqdm import tqdm

    from bitnet_jax import sharding, train_state
    from bitnet_jax.anomaly import AnomalyDetector, poison_if_due
    from bitnet_jax.bitnet_metrics import BitNetMetrics
    from bitnet_jax.checkpoint import CheckpointManager, save_hook
    from bitnet_jax.data import (build_eval_batches, build_train_loader, check_vocab, load_tokenizer,
                                 write_fingerprint)
    from bitnet_jax.data.heldout import heldout_set
    from bitnet_jax.data.sources import source_spec
    from bitnet_jax.evaluation import Evaluator, eval_scalars
    from bitnet_jax.hooks import Hook, run_hooks
    from bitnet_jax.metrics import StepMetrics, TensorBoard, device_peak_flops
    from bitnet_jax.model import flops_per_token
    from bitnet_jax.provenance import write_provenance
    from bitnet_jax.samples import SampleHook

    # Tokenizer: check it fits the model before any compute, keep a copy with the run.
    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(cfg, tokenizer)
    if jax.process_index() == 0:  # one writer: the processes share the run directory
        tokenizer.save(paths.tokenizer)

    # Model, optimizer state and the jitted steps, laid out on the mesh (restored when resuming).
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(cfg, mesh)
    graphdef, state, state_sharding, restored = resume_lib.initial_state(cfg, mesh, resume)
    train_step = train_state.make_train_step(cfg, graphdef, mesh, state_sharding)
    eval_step = train_state.make_eval_step(graphdef, mesh, state_sharding.params)

    # Data: this process's shard of every global batch; fixed held-out batches for evaluation.
    pi, pc = jax.process_index(), jax.process_count()
    heldout = heldout_set(cfg, tokenizer, source_spec(cfg.data))  # read once: eval, fingerprint, loader
    if pi == 0:  # one writer; it fingerprints the whole (unsharded) stream
        write_fingerprint(paths.root / "dataset_fingerprint.json", cfg, tokenizer, heldout)
    evaluator = Evaluator(eval_step, build_eval_batches(cfg, tokenizer, pi, pc, heldout), mesh)
    if pi == 0:
        write_provenance(paths.root, config_lib.dump(cfg), resumed_from_step=restored.step if restored else None)

    tb = TensorBoard(paths.tb, enabled=pi == 0)
    total = cfg.train.steps
    show_progress = cfg.log.progress and pi == 0 and sys.stderr.isatty()  # quiet in logs and subprocesses
    progress = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True, disable=not show_progress,
                    mininterval=1.0)
    peak = cfg.log.peak_flops or device_peak_flops()
    metrics = StepMetrics(tb, tokens_per_step=cfg.tokens_per_step,
                          flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                          peak_flops_total=peak * jax.device_count() if peak else None, progress=progress,
                          window=max(1000, cfg.eval.every))  # eval/train_eval_gap averages since the last eval
    anomalies = AnomalyDetector(cfg, paths.root, tb, tokenizer, write=pi == 0)
    metrics.listeners.append(anomalies.on_step_metrics)
    bitnet_metrics = BitNetMetrics(graphdef, evaluator.batches[0] if evaluator.batches else None)
    samples = SampleHook(cfg, tokenizer, graphdef, paths.root, tb, write=pi == 0,
                         on_samples=anomalies.check_samples)

    summary = {"eval_loss": None, "first_loss": None}
    last_eval = {"step": 0}

    def evaluate(step: int) -> None:
        loss = evaluator(state.params)
        tb.scalars(step, eval_scalars(loss, metrics.mean_loss_since(last_eval["step"])))
        last_eval["step"] = step
        summary["eval_loss"] = loss

    # Host-side objects saved with every checkpoint: state_dict() / load_state_dict(d).
    resumables: dict[str, object] = {"anomaly": anomalies, "metrics": metrics}
    ckpt = CheckpointManager(paths.root, cfg)

    def save(step: int) -> None:
        if anomalies.halt_reason is None:  # train.on_nan=halt: nothing from the bad step on is saved
            ckpt.save(step, state, data_state=loader.state_dict(), resumables=resumables)

    # BitNet metrics and samples also run at the last step, unless the run is shorter than their
    # interval (short test runs then skip compiling them).
    log = cfg.log
    samples_every = log.samples_every if log.prompts else 0
    hooks = [
        Hook("eval", cfg.eval.every if run_eval else 0, evaluate, at_end=run_eval, timing_tag="time/eval_ms"),
        Hook("metrics", log.metrics_every, lambda s: tb.scalars(s, bitnet_metrics(state.params)),
             at_end=0 < log.metrics_every <= total, timing_tag="time/metrics_ms"),
        Hook("samples", samples_every, lambda s: samples(s, state.params),
             at_end=0 < samples_every <= total, timing_tag="time/samples_ms"),
        save_hook(cfg, save),
    ]

    step = int(jax.device_get(state.step))
    if restored:
        resume_lib.load_resumables(resumables, restored.meta)
        if cfg.eval.every and run_eval:  # the eval an uninterrupted run made last (the mean since then)
            last_eval["step"] = step // cfg.eval.every * cfg.eval.every
        ckpt.last_saved = None if resume.target.new_run else step
    # The loader's thread and tokenizer processes start here, right before the try that closes them.
    loader = build_train_loader(cfg, tokenizer, process_index=pi, process_count=pc,
                                state=restored.data_state if restored else None, heldout=heldout)
    stop = resume_lib.StopRequest()
    if pc == 1:
        stop.install()
    end = stop_at or total
    stopped_by = None  # why the loop ended early, in words
    metrics.start_clock()
    try:
        while step < end:
            if stop.requested:
                stopped_by = stop.signal_name
                break
            if ckpt.reached_preemption(step):
                stopped_by = "a preemption notice (SIGTERM to one of the processes)"
                break
            if anomalies.halt_reason:
                break
            try:
                rows = next(loader)
            except StopIteration:  # data.repeat=false and the source is used up: save and stop cleanly
                stopped_by = "the end of the data (data.repeat=false)"
                summary["data_ran_out"] = True
                break
            rows = poison_if_due(rows, step + 1, cfg.train.debug_poison_step, cfg.model.vocab_size)
            anomalies.remember_batch(step + 1, rows)  # host rows, for a dump if step + 1 turns out bad
            batch = sharding.global_batch(rows, mesh)
            state, step_metrics = train_step(state, batch)
            step += 1
            metrics.push(step, step_metrics)
            ckpt.check_background_errors(step)  # host-side: never waits for the device or the disk
            due = [h for h in hooks if h.due(step, total)]
            if due:
                metrics.flush()  # hooks read the latest values; the device syncs here anyway
                mark = metrics.pause_clock()
                run_hooks(due, step, on_time=lambda tag, ms, s=step: tb.scalars(s, {tag: ms}))
                metrics.resume_clock(mark)
            if summary["first_loss"] is None and metrics.losses:
                summary["first_step"], summary["first_loss"] = metrics.losses[0]
        metrics.flush()
        if ckpt.last_saved != step:  # the final step, --stop-at, or a stop request
            save(step)
        ckpt.wait()
    finally:
        stop.uninstall()
        ckpt.close()
        progress.close()
        loader.close()
        tb.close()
    summary.update(final_loss=metrics.last.get("loss"), step=step, total_steps=total,
                   median_step_ms=metrics.median_step_ms(), tokens_per_step=cfg.tokens_per_step,
                   stopped_by=stopped_by or ("--stop-at" if step == stop_at < total else None),
                   stop_seconds=stop.seconds_since(), halted=anomalies.halt_reason)
    return summary


def print_summary(paths: RunPaths, summary: dict) -> None:
    first, last = summary.get("first_loss"), summary.get("final_loss")
    print()
    if first is not None and last is not None:
        drop = 100.0 * (1 - last / first)
        print(f"train loss: {first:.4f} (step {summary['first_step']}) -> {last:.4f} (step {summary['step']}), "
              f"{drop:.1f}% lower")
    if summary.get("eval_loss") is not None:
        print(f"eval loss:  {summary['eval_loss']:.4f} (perplexity {math.exp(summary['eval_loss']):.1f})")
    if summary.get("median_step_ms"):
        tps = summary["tokens_per_step"] / (summary["median_step_ms"] / 1e3)
        print(f"speed:      {summary['median_step_ms']:.1f} ms/step, {tps:,.0f} tokens/s (median)")
    print(f"run directory: {paths.root}")
    print(f"watch it:      tensorboard --logdir {paths.tb}   or   python status.py {paths.root}")
    if summary.get("halted"):
        print(f"halted (train.on_nan=halt) at {summary['halted']}; nothing after the last good step was "
              f"saved; see {paths.root / 'anomalies'}")
    elif summary.get("stopped_by"):
        took = f" in {summary['stop_seconds']:.1f} s" if summary.get("stop_seconds") is not None else ""
        print(f"stopped by {summary['stopped_by']} at step {summary['step']} of {summary['total_steps']}: "
              f"saved checkpoints/{summary['step']}{took}")
        if summary.get("data_ran_out"):
            print(f"to train on, start a new run from it with more data (its stream starts afresh): --resume "
                  f"{paths.root / 'checkpoints' / str(summary['step'])} --run-id NEW_ID --set data.data_files=... "
                  "(or --set data.repeat=true)")
        else:
            print(f"resume with:   {resume_lib.resume_command(paths.root)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
        distributed.initialize(group)  # before any device is touched; no-op for one process
        plan = None
        if args.resume:
            cfg, plan = resume_lib.plan(args.resume, args.runs_dir, args.run_id, args.config,
                                        args.overrides, args.stop_at, dry_run=args.dry_run)
        elif args.config:
            cfg, notes = config_lib.load_with_notes(args.config, args.overrides)
            print("".join(f"note: {note}\n" for note in notes), end="", file=sys.stderr)
            resume_lib.check_stop_at(args.stop_at, cfg)
        else:
            raise ConfigError("give --config FILE for a new run (see configs/), or --resume to continue one")
        if args.dry_run:
            dry_run(cfg)
            return 0
        if group and not args.run_id:  # every process must write to the same run directory
            args.run_id = default_run_id(cfg, distributed.broadcast_from_first(int(time.time())))
        if plan and not plan.target.new_run:
            paths = RunPaths(plan.target.run_dir)
            (paths.root / "config.yaml").write_text(config_lib.dump(cfg))
        else:
            paths = prepare_run_dir(cfg, args.runs_dir, args.run_id)
        summary = train(cfg, paths, resume=plan, stop_at=args.stop_at, run_eval=not args.no_eval)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(paths, summary)
    return 3 if summary.get("halted") else 0
