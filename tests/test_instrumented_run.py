"""End to end: real train.py runs (stopped, resumed, halted) write every DESIGN tag, provenance,
samples, anomaly dumps, and never a NaN checkpoint; the generate CLI samples their checkpoints."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bitnet_jax.config import ModelConfig
from bitnet_jax.metrics import device_peak_flops
from bitnet_jax.model import flops_per_token
from bitnet_jax.sample_text import parse_sample_markdown, sample_tag
from bitnet_jax.tb_layout import CUSTOM_SCALARS
from bitnet_jax.units import format_count
from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

TINY = ["train.steps=24", "optim.warmup_steps=2", "model.hidden_size=64", "model.intermediate_size=128",
        "train.batch_size=4", "train.seq_len=32", "eval.batches=1", "log.max_new_tokens=8"]
MODES = ("greedy", "typical", "stress")


def train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)


def sets(items):
    return [a for item in items for a in ("--set", item)]


def events(run_dir):
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: {e.step: e.value for e in ea.Scalars(t)} for t in ea.Tags()["scalars"]}
    texts = {t: {e.step: e.tensor_proto.string_val[0].decode() for e in ea.Tensors(t)}
             for t in ea.Tags()["tensors"] if ea.SummaryMetadata(t).plugin_data.plugin_name == "text"}
    return scalars, texts


def train_in(cwd, *args):
    """train.py run from ``cwd`` (e.g. the folder holding runs/, to give it relative paths)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """24 steps with a poisoned batch at step 5, stopped at 12 and resumed to the end. The resume is
    ``--resume runs/main``, relative to the folder holding runs/, its working directory."""
    work = tmp_path_factory.mktemp("work")
    runs = work / "runs"
    overrides = sets(TINY + ["eval.every=8", "log.metrics_every=8", "log.samples_every=12", "checkpoint.every=8",
                             "train.debug_poison_step=5", "log.peak_flops=1e12", "log.print_every=4"])
    first = train("--config", "configs/tiny.yaml", "--runs-dir", str(runs), "--run-id", "main", "--stop-at", "12",
                  *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = runs / "main"
    second = train_in(work, "--resume", "runs/main")
    assert second.returncode == 0, second.stderr[-3000:]
    return run_dir, first, second


def test_every_design_tag_is_written(run):
    run_dir, _, _ = run
    scalars, texts = events(run_dir)
    per_step = ["train/loss", "train/lr", "train/wd", "train/grad_norm", "train/step_time_ms",
                "train/tokens_per_sec", "train/tokens_seen", "train/stage", "train/mfu"]
    for tag in per_step:
        assert sorted(scalars[tag]) == list(range(1, 25)), tag
    assert scalars["train/tokens_seen"][24] == 24 * 4 * 32
    # MFU = tokens/s x (6N + 12 L d T) / peak, with log.peak_flops = 1e12 on this one device
    fpt = flops_per_token(ModelConfig(hidden_size=64, intermediate_size=128), 32)
    for s in (3, 20):
        assert scalars["train/mfu"][s] == pytest.approx(scalars["train/tokens_per_sec"][s] * fpt / 1e12, rel=1e-4)
    for tag in ("eval/loss", "eval/perplexity", "eval/train_eval_gap", "time/eval_ms"):
        assert sorted(scalars[tag]) == [8, 16, 24], tag
    assert scalars["eval/perplexity"][24] == pytest.approx(math.exp(scalars["eval/loss"][24]), rel=1e-5)
    # the gap is against the mean train loss since the previous eval (the NaN step left out)
    train_mean = np.mean([scalars["train/loss"][s] for s in range(1, 9) if s != 5])
    assert scalars["eval/train_eval_gap"][8] == pytest.approx(scalars["eval/loss"][8] - train_mean, rel=1e-4)
    for layer in (0, 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            prefix = f"bitnet/layers.{layer}.{proj}"
            for stat in ("frac_neg", "frac_zero", "frac_pos", "gamma", "latent_rms", "act_absmax_mean",
                         "act_absmax_max"):
                assert sorted(scalars[f"{prefix}/{stat}"]) == [8, 16, 24], (prefix, stat)
            # The previous ternary pattern lives on the device: the first measurement after the
            # resume at 12 (step 16) has no flip rate.
            assert sorted(scalars[f"{prefix}/flip_rate"]) == [24]
    assert sorted(scalars["time/metrics_ms"]) == [8, 16, 24]
    for index, prompt in enumerate(("The meaning of", "A function is", "In Python,")):
        for mode in MODES:
            assert sorted(texts[sample_tag(index, prompt, mode)]) == [12, 24]
    assert sorted(scalars["time/samples_ms"]) == [12, 24]
    assert "step 5:" in texts["anomaly/nonfinite"][5] and scalars["anomaly/count"] == {5: 1.0}


def test_custom_scalars_layout_covers_every_scalar_the_run_wrote(run):
    import re

    run_dir, _, _ = run
    scalars, _ = events(run_dir)
    charts = {(category, title): tags for category, cs in CUSTOM_SCALARS.items() for title, (_, tags) in cs.items()}
    for chart, regexes in charts.items():  # no chart stays empty on a real run (tags renamed, say)
        assert any(re.match(r, tag) for r in regexes for tag in scalars), chart
    for tag in scalars:  # and no curve is missing from the layout
        assert any(re.match(r, tag) for regexes in charts.values() for r in regexes), tag


def test_poisoned_batch_is_skipped_dumped_and_never_checkpointed(run):
    from bitnet_jax.checkpoint import load_params
    from bitnet_jax.run_dir import complete_steps

    run_dir, _, _ = run
    scalars, _ = events(run_dir)
    assert math.isnan(scalars["train/loss"][5]) and scalars["train/skipped_updates"][5] == 1
    assert all(math.isfinite(v) for s, v in scalars["train/loss"].items() if s != 5)
    dump = run_dir / "anomalies" / "5_nonfinite"
    info = json.loads((dump / "event.json").read_text())
    assert info["last_good_step"] == 4 and info["batch_step"] == 5
    tokens = np.load(dump / "batch_tokens.npy")
    assert tokens.shape == (4, 33) and tokens[0, 0] == 4096  # the poisoned id, out of the vocabulary
    assert "<bad id 4096>" in (dump / "batch_text.txt").read_text()
    steps = complete_steps(run_dir)
    assert steps[-1] == 24 and 8 in steps
    for step in (8, 24):
        _, params, _ = load_params(run_dir, step)
        leaves = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(params)]
        assert all(np.isfinite(x).all() for x in leaves), step


def test_anomaly_history_is_saved_with_the_checkpoint_and_restored(run):
    from bitnet_jax.run_dir import read_meta

    run_dir, _, second = run
    saved = read_meta(run_dir / "checkpoints" / "12")["resumables"]["anomaly"]
    assert saved["count"] == 1 and saved["last_good_step"] == 12
    assert len(saved["loss_window"]) == 11  # steps 1-12 without the non-finite one
    assert "no state for 'anomaly'" not in second.stderr
    final = read_meta(run_dir / "checkpoints" / "24")["resumables"]["anomaly"]
    assert final["count"] == 1 and len(final["loss_window"]) == 23 and final["last_good_step"] == 24


def test_peak_flops_table_matches_device_kinds():
    class Kind:  # what jax.Device reports; the lookup reads nothing else
        def __init__(self, kind):
            self.device_kind = kind

    assert device_peak_flops(Kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert device_peak_flops(Kind("NVIDIA H100 PCIe")) == 756e12
    assert device_peak_flops(Kind("NVIDIA H100 NVL")) == 835e12
    assert device_peak_flops(Kind("NVIDIA H200")) == 989e12
    assert device_peak_flops(Kind("NVIDIA A100-SXM4-80GB")) == 312e12
    assert device_peak_flops(Kind("cpu")) is None


def test_provenance_has_a_record_per_start(run):
    run_dir, _, _ = run
    records = json.loads((run_dir / "provenance.json").read_text())["records"]
    assert [r["resumed_from_step"] for r in records] == [None, 12]
    assert records[0]["config_sha256"] == records[1]["config_sha256"]
    assert records[0]["packages"]["jax"] and records[0]["devices"]["device_count"] >= 1
    assert (run_dir / "config.yaml").is_file() and (run_dir / "dataset_fingerprint.json").is_file()


def test_samples_jsonl_matches_tensorboard_text(run):
    run_dir, _, _ = run
    _, texts = events(run_dir)
    lines = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 3 * 3
    for rec in lines:
        assert {"step", "prompt_index", "prompt", "mode", "text"} <= set(rec)
        body = texts[sample_tag(rec["prompt_index"], rec["prompt"], rec["mode"])][rec["step"]]
        assert parse_sample_markdown(body) == (rec["prompt"], rec["text"])  # verbatim, with its prompt
        assert 0 < rec["num_tokens"] <= 8
    assert {r["prompt"] for r in lines} == {"The meaning of", "A function is", "In Python,"}


def test_progress_bar_is_quiet_off_a_terminal_but_the_summary_prints(run):
    _, first, second = run
    for proc in (first, second):
        assert "step/s" not in proc.stderr and "s/step" not in proc.stderr
        assert "train loss:" in proc.stdout and "run directory:" in proc.stdout


def test_a_run_talks_in_a_log_while_it_trains(run):
    """stdout is a pipe here, as under nohup or SLURM: the start block, a line every log.print_every
    steps, evals, saved checkpoints and the anomaly warning all print as they happen, once each."""
    from bitnet_jax.checkpoint import load_params

    run_dir, first, second = run
    # the parameters the run trains: what its checkpoint holds, counted leaf by leaf
    _, params, _ = load_params(run_dir, 24)
    n = sum(np.size(v.get_value()) for _, v in nnx.to_flat_state(params))
    assert n > 0
    for proc, start in ((first, "step 0 (new run)"), (second, f"resumed from {run_dir / 'checkpoints' / '12'} (step 12)")):
        out = proc.stdout
        for row in (f"run directory:   {run_dir}", "config:          tiny", "tokens per step: 128 (4 x 32)",
                    "devices:", "mesh {'data': 1, 'fsdp': 1}", "steps:           24", f"start:           {start}"):
            assert row in out, row
        (shown,) = re.findall(r"^  parameters: +([\d,]+) \((\S+)\)$", out, re.M)
        assert int(shown[0].replace(",", "")) == n and shown[1] == format_count(n), shown
    lines = lambda out: re.findall(r"^step +(\d+)/24 \| loss [\d.]+ \| lr [\d.e+-]+ \| (?:[\d,]+ tok/s \| mfu [\d.]+% "
                                   r"\| eta |first step )", out, re.M)
    # The session's first step, then every 4th; a line after 60 s of silence may come in between.
    periodic = lambda out: [int(s) for s in lines(out) if int(s) % 4 == 0 or int(s) in (1, 13)]
    assert periodic(first.stdout) == [1, 4, 8, 12] and periodic(second.stdout) == [13, 16, 20, 24]
    assert "eval at step 8: loss" in first.stdout
    assert "eval at step 16: loss" in second.stdout and "eval at step 24: loss" in second.stdout
    for proc, steps in ((first, (8, 12)), (second, (16, 24))):
        for step in steps:
            assert len(re.findall(rf"^checkpoint {step} saved", proc.stdout, re.M)) == 1, (step, proc.stdout)
    warning = [line for line in first.stdout.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "nonfinite at step 5" in warning[0]
    assert str(run_dir / "anomalies" / "5_nonfinite") in warning[0]
    assert "NaN or Inf" not in first.stdout + first.stderr  # the project's warning is the only message


def test_generate_cli_samples_a_checkpoint(run):
    run_dir, _, _ = run
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.generate", str(run_dir), "--step", "16",
                          "--prompt", "In Python,", "--mode", "stress", "--max-new-tokens", "6"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("In Python,") and len(out.stdout) > len("In Python,\n")
    assert "step 16, stress" in out.stderr
    bad = subprocess.run([sys.executable, "-m", "bitnet_jax.generate", str(run_dir), "--prompt", "x",
                          "--max-new-tokens", "1000"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "max_position_embeddings" in bad.stderr


def test_generate_cli_reads_a_run_dir_relative_to_another_working_directory(run):
    """As the README writes it (``runs/<run_id>``), from the run's parent folder rather than the repo."""
    run_dir, _, _ = run
    out = subprocess.run([sys.executable, "-m", "bitnet_jax.generate", run_dir.name, "--step", "16",
                          "--prompt", "In Python,", "--max-new-tokens", "4"],
                         cwd=run_dir.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("In Python,") and f"[{run_dir.name} step 16, greedy]" in out.stderr


def test_status_and_resume_take_paths_relative_to_the_folder_holding_runs(run):
    """Issue 13, item 2: from the folder holding runs/, status.py takes runs/<id>, and train.py takes
    --resume runs/<id> (the fixture's resume) and --resume runs/<id>/checkpoints/<STEP> (a new run,
    under the default, relative, --runs-dir runs) as written."""
    from bitnet_jax.run_dir import complete_steps

    run_dir, _, second = run
    work = run_dir.parent.parent

    def status(*args):
        out = subprocess.run([sys.executable, str(REPO_ROOT / "status.py"), *args], cwd=work, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    assert f"resumed from {run_dir / 'checkpoints' / '12'} (step 12)" in second.stdout  # --resume runs/main
    st = json.loads(status("runs/main", "--json"))
    assert (st["state"], st["step"], st["total_steps"], st["checkpoints"]) == ("finished", 24, 24, complete_steps(run_dir))
    assert status("runs/main").splitlines()[0] == "Training Status: main   [finished]"

    branch = train_in(work, "--resume", "runs/main/checkpoints/16", "--run-id", "branch", "--stop-at", "17", "--no-eval")
    assert branch.returncode == 0, branch.stderr[-3000:]
    branch_dir = work / "runs" / "branch"
    assert f"run directory:   {branch_dir}" in branch.stdout
    assert f"start:           resumed from {run_dir / 'checkpoints' / '16'} (step 16)" in branch.stdout
    assert complete_steps(branch_dir) == [17]
    records = json.loads((branch_dir / "provenance.json").read_text())["records"]
    assert [r["resumed_from_step"] for r in records] == [16]
    # the same state and data position as the original run at step 16: the same step 17, bit for bit
    assert events(branch_dir)[0]["train/loss"] == {17: events(run_dir)[0]["train/loss"][17]}
    st = json.loads(status("runs/branch", "--json"))
    assert (st["state"], st["step"], st["checkpoints"]) == ("stopped", 17, [17])


def test_halt_on_nan_stops_without_saving_the_bad_step(tmp_path):
    from bitnet_jax.run_dir import complete_steps

    proc = train("--config", "configs/tiny.yaml", "--runs-dir", str(tmp_path), "--run-id", "halt", "--no-eval",
                 *sets(TINY + ["train.steps=10", "train.on_nan=halt", "train.debug_poison_step=3",
                               "checkpoint.every=2", "log.metrics_every=0", "log.samples_every=0"]))
    assert proc.returncode == 3, proc.stderr[-3000:]
    run_dir = tmp_path / "halt"
    assert "halted" in proc.stdout and "step 3" in proc.stdout
    assert complete_steps(run_dir) == [2]  # nothing from the non-finite step on
    assert (run_dir / "anomalies" / "3_nonfinite" / "event.json").is_file()
    scalars, _ = events(run_dir)
    assert not any(t.startswith("eval/") for t in scalars)  # --no-eval
    assert max(scalars["train/loss"]) <= 4
    # status.py reads the end record: halted, not running (and later stale)
    status = subprocess.run([sys.executable, "status.py", str(run_dir), "--json"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    st = json.loads(status.stdout)
    assert st["state"] == "halted" and st["end"]["exit_code"] == 3 and "step 3" in st["end"]["reason"], st
