"""A training run: wires config, tokenizer, data, model, optimizer and hooks together, then runs the
loop (``train``). The command line around it (arguments, the start, the summary, exit codes) is
train_cli.py.
"""

from __future__ import annotations

import dataclasses
import sys

from bitnet_jax import config as config_lib
from bitnet_jax import resume as resume_lib
from bitnet_jax.config import Config
from bitnet_jax.run_dir import RunPaths
from bitnet_jax.units import format_count


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """What a start reads before it writes anything: a bad tokenizer or data file fails here, before
    the run folder exists."""

    tokenizer: object  # bitnet_jax.data.Tokenizer
    heldout: object  # bitnet_jax.data.heldout.HeldOut, read once: eval batches, fingerprint, loader


def read_inputs(cfg: Config) -> RunInputs:
    """The tokenizer (checked against the model and the prompts) and the held-out set, whose reading
    opens the data source: every input a start can get wrong, checked before anything is written."""
    from bitnet_jax.data import check_vocab, load_tokenizer
    from bitnet_jax.data.heldout import heldout_set
    from bitnet_jax.data.sources import source_spec

    from bitnet_jax.samples import checked_prompts

    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(cfg, tokenizer)
    checked_prompts(cfg, tokenizer)
    return RunInputs(tokenizer, heldout_set(cfg, tokenizer, source_spec(cfg.data)))


def train(cfg: Config, paths: RunPaths, inputs: RunInputs, resume: resume_lib.ResumePlan | None = None,
          stop_at: int | None = None, run_eval: bool = True, on_second_interrupt=None) -> dict:
    """Runs the whole training (or continues ``resume``, up to ``stop_at``); returns a summary (first
    and last loss, eval loss, throughput, skipped updates, what stopped it). ``on_second_interrupt``:
    what a second Ctrl-C does (``signals.StopRequest``)."""
    import jax

    from bitnet_jax import sharding, train_state
    from bitnet_jax.anomaly import AnomalyDetector
    from bitnet_jax.checkpoint import CheckpointManager
    from bitnet_jax.console import Console
    from bitnet_jax.data import build_eval_batches, build_train_loader, write_fingerprint
    from bitnet_jax.evaluation import Evaluator
    from bitnet_jax.loop import END_OF_DATA, run_loop
    from bitnet_jax.metrics import StepMetrics, TensorBoard, device_peak_flops
    from bitnet_jax.model import flops_per_token
    from bitnet_jax.provenance import write_provenance
    from bitnet_jax.signals import StopRequest

    pi, pc = jax.process_index(), jax.process_count()
    writer = pi == 0  # one writer: the processes share the run directory
    tokenizer, heldout = inputs.tokenizer, inputs.heldout
    if writer:  # a copy of the tokenizer and what the run trains on, kept with the run
        tokenizer.save(paths.tokenizer)
        write_fingerprint(paths.root / "dataset_fingerprint.json", cfg, tokenizer, heldout)

    # Model, optimizer state and the jitted steps, laid out on the mesh (restored when resuming).
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch_fits(cfg, mesh)
    graphdef, state, state_sharding, restored = resume_lib.initial_state(cfg, mesh, resume)
    train_step = train_state.make_train_step(cfg, graphdef, mesh, state_sharding)
    evaluator = Evaluator(train_state.make_eval_step(graphdef, mesh, state_sharding.params),
                          build_eval_batches(cfg, tokenizer, pi, pc, heldout), mesh)
    start = int(jax.device_get(state.step))
    if writer:
        write_provenance(paths.root, config_lib.dump(cfg), resumed_from_step=restored.step if restored else None)

    # Instrumentation: metrics fetched one step behind, the console, anomalies, checkpoints.
    tb = TensorBoard(paths.tb, enabled=writer)
    console = Console(total_steps=cfg.train.steps, start_step=start, print_every=cfg.log.print_every,
                      enabled=writer, bar=cfg.log.progress and sys.stderr.isatty())
    console.block(f"bitnet-jax run {paths.root.name}", start_rows(cfg, paths, mesh, restored))
    peak = cfg.log.peak_flops or device_peak_flops()
    fetcher = StepMetrics(tokens_per_step=cfg.tokens_per_step, flops_per_token=flops_per_token(cfg.model, cfg.train.seq_len),
                          peak_flops_total=peak * jax.device_count() if peak else None,
                          window=max(1000, cfg.eval.every))  # eval/train_eval_gap averages since the last eval
    anomalies = AnomalyDetector(cfg, paths.root, tb, tokenizer, write=writer, warn=console.warn)
    ckpt = CheckpointManager(paths.root, cfg, kept=resume.kept if resume else None)
    resumables = {"anomaly": anomalies, "metrics": fetcher}  # host state saved with every checkpoint
    if restored:
        resume_lib.load_resumables(resumables, restored.meta)
        ckpt.last_saved = None if resume.target.new_run else start
    stop = StopRequest(on_second_interrupt).install() if pc == 1 else StopRequest()
    stops = [lambda step: stop.signal_name,
             lambda step: "a preemption notice (SIGTERM to one of the processes)" if ckpt.reached_preemption(step) else None,
             lambda step: anomalies.halt_reason and "non-finite steps (train.on_nan)"]
    # The loader's thread and tokenizer processes start here, right before the try that closes them.
    loader = build_train_loader(cfg, tokenizer, process_index=pi, process_count=pc,
                                state=restored.data_state if restored else None, heldout=heldout)
    try:
        hooks, evals = make_hooks(cfg, paths, graphdef, tokenizer, tb, console, fetcher, anomalies, ckpt, loader,
                                 resumables, evaluator if run_eval else None, start)
        end = run_loop(train_step, state, device_batches(loader, start, anomalies, cfg, mesh), start_step=start,
                       end_step=stop_at or cfg.train.steps, fetcher=fetcher, hooks=hooks, stops=stops,
                       on_time=lambda step, tag, ms: tb.scalars(step, {tag: ms}))
    finally:
        ckpt.close()
        console.close()
        loader.close()
        tb.close()
        stop.uninstall()  # (after the cleanup: a second Ctrl-C during it still ends the run at once)
    return {"first": console.first, "final_loss": console.last.get("loss"), "skipped": anomalies.skipped,
            "eval_loss": evals.loss if evals else None, "step": end.step, "total_steps": cfg.train.steps,
            "median_step_ms": fetcher.median_step_ms(), "tokens_per_step": cfg.tokens_per_step,
            "stopped_by": end.stopped_by or ("--stop-at" if end.step == stop_at < cfg.train.steps else None),
            "data_ran_out": end.stopped_by == END_OF_DATA, "stop_seconds": stop.seconds_since(),
            "halted": anomalies.halt_reason}


def start_rows(cfg: Config, paths: RunPaths, mesh, restored) -> list[tuple[str, object]]:
    """The start block's rows: where the run writes, what it trains, on what, for how long."""
    import jax

    from bitnet_jax.model import count_params

    n = count_params(cfg.model)
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))"
    return [
        ("run directory", paths.root),
        ("config", cfg.name),
        ("parameters", f"{n:,} ({format_count(n)})"),
        ("devices", f"{devices}, mesh {dict(mesh.shape)}"),
        ("tokens per step", f"{cfg.tokens_per_step:,} ({cfg.train.batch_size} x {cfg.train.seq_len})"),
        ("steps", f"{cfg.train.steps:,} ({format_count(cfg.total_tokens)} tokens), stage switch after step "
                  f"{cfg.stage_switch:,}"),
        ("start", f"resumed from {restored.step_dir} (step {restored.step:,})" if restored else "step 0 (new run)"),
    ]


def make_hooks(cfg: Config, paths: RunPaths, graphdef, tokenizer, tb, console, fetcher, anomalies, ckpt, loader,
              resumables: dict, evaluator, start: int):
    """The run's hooks, in the order they run at a step: per-step ones (one step behind), then the
    ones that need the state. Returns ``(hooks, the eval hook or None)``."""
    from bitnet_jax.bitnet_metrics import BitNetMetrics
    from bitnet_jax.evaluation import PeriodicEval
    from bitnet_jax.hooks import Hook
    from bitnet_jax.metrics import train_scalars_hook
    from bitnet_jax.samples import Sampler
    from bitnet_jax.saving import Checkpointing

    total, log = cfg.train.steps, cfg.log
    # BitNet metrics and samples also run at the last step, unless the run is shorter than their
    # interval (short test runs then skip compiling them).
    def last_step_if(every: int) -> frozenset[int]:
        return frozenset({total}) if 0 < every <= total else frozenset()

    saving = Checkpointing(cfg, ckpt, data_state=loader.state_dict, resumables=resumables,
                           halted=lambda: anomalies.halt_reason is not None, tb=tb, say=console.say)
    hooks = [train_scalars_hook(tb), Hook("anomaly", lambda i: anomalies.on_step_metrics(i.step, i.metrics)),
             console.hook(), saving.watch_hook()]
    evals = None
    if evaluator is not None and cfg.eval.every:
        evals = PeriodicEval(evaluator, fetcher, tb, console.say, every=cfg.eval.every, last_step=total,
                             start_step=start)
        hooks.append(evals.hook())
    if log.metrics_every:
        measure = BitNetMetrics(graphdef, evaluator.batches[0] if evaluator and evaluator.batches else None)
        hooks.append(Hook("metrics", lambda i: tb.scalars(i.step, measure(i.state.params)), every=log.metrics_every,
                          steps=last_step_if(log.metrics_every), needs_state=True, timed=True))
    samples_every = log.samples_every if log.prompts else 0
    if samples_every:
        sampler = Sampler(cfg, tokenizer, graphdef, paths.root, tb, write=tb.enabled)
        hooks.append(Hook("samples", lambda i: anomalies.check_samples(i.step, sampler(i.step, i.state.params)),
                          every=samples_every, steps=last_step_if(samples_every), needs_state=True, timed=True))
    hooks.append(saving.save_hook())
    return hooks, evals


def device_batches(loader, start: int, anomalies, cfg: Config, mesh):
    """The loader's host rows as global device batches; each batch's rows are kept for an anomaly dump
    of the step it makes (and poisoned at ``train.debug_poison_step``, the NaN path's test switch)."""
    from bitnet_jax import sharding
    from bitnet_jax.anomaly import poison_if_due

    for step, rows in enumerate(loader, start + 1):
        rows = poison_if_due(rows, step, cfg.train.debug_poison_step, cfg.model.vocab_size)
        anomalies.remember_batch(step, rows)
        yield sharding.global_batch(rows, mesh)
