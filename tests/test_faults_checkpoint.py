"""Fault injection against real runs: damaged checkpoint contents are detected on resume (checksums,
bitnet_jax/state_checksum.py), each damaged step costs one line on stderr (Orbax's noise goes to
RUN_DIR/orbax_errors.log), a save that cannot be written stops the run with one message and exit 2
(and the run resumes exactly once the cause is gone), and status.py names a save cut off half-way as
abandoned.

Every run is a subprocess of train.py on a tiny model (12 steps, checkpoints every 4; the stage
switch at 6 adds steps 5 and 6). One uninterrupted run is the reference; one run stopped at step 8 is
the template each test copies and damages.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import tiny_train_args

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = tiny_train_args(STEPS, checkpoint_every=4)

pytestmark = pytest.mark.slow


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
            "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def run(script: str, *args, expect: int | None = 0, file_size_limit: int | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """``file_size_limit`` (kB): no file the process writes may grow past it (the shell's ``ulimit -f``:
    writes fail with EFBIG as on a full disk; SIGXFSZ ignored, so that they fail instead of killing)."""
    command = [sys.executable, str(REPO / script), *args]
    if file_size_limit:
        command = ["bash", "-c", f'ulimit -f {file_size_limit}; trap "" XFSZ; exec "$@"', "bash", *command]
    out = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if expect is not None:
        assert out.returncode == expect, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def stored_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a step's state/ item, read with Orbax alone, as numpy by leaf path."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(str(step_dir / "state"))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted run's final arrays, a run directory stopped at step 8)."""
    root = tmp_path_factory.mktemp("runs")
    run("train.py", *TINY, "--runs-dir", str(root), "--run-id", "ref")
    run("train.py", *TINY, "--runs-dir", str(root), "--run-id", "stopped", "--stop-at", "8")
    return stored_arrays(root / "ref" / "checkpoints" / str(STEPS)), root / "stopped", root / "ref"


def copy_of(template: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "r"
    shutil.copytree(template, run_dir)
    return run_dir


def largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def flip_bytes(path: Path, at: int, n: int = 4) -> None:
    data = bytearray(path.read_bytes())
    data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
    path.write_bytes(bytes(data))


def resume_latest_falls_back(run_dir: Path, reference: dict) -> str:
    out = run("train.py", "--resume", "latest", "--runs-dir", str(run_dir.parent), "--run-id", run_dir.name,
              "--no-eval")
    lines = out.stderr.splitlines()
    resumed = [line for line in lines if line.startswith("resuming from ")]
    assert resumed == [f"resuming from {run_dir / 'checkpoints' / '6'} (step 6, 768 tokens seen)"], out.stderr
    (warning,) = [line for line in lines if line not in resumed]  # one line for the damaged step, nothing else
    assert warning.startswith("warning: skipping checkpoint") and f"{run_dir}/checkpoints/8 is damaged" in warning
    assert "trying step 6" in warning
    assert [p.name.split(".")[0] for p in (run_dir / "damaged_checkpoints").iterdir()] == ["8"]
    final = stored_arrays(run_dir / "checkpoints" / str(STEPS))
    assert final.keys() == reference.keys()
    for name, x in reference.items():
        np.testing.assert_array_equal(final[name], x, err_msg=name)  # bit for bit
    return warning


def test_flipped_bytes_in_an_array_chunk_fall_back_to_the_older_step_and_finish_exactly(runs, tmp_path):
    reference, template, _ = runs
    run_dir = copy_of(template, tmp_path)
    path = largest_array_file(run_dir / "checkpoints" / "8")
    flip_bytes(path, path.stat().st_size // 2)  # inside a zstd frame: decodes to other numbers, no error
    warning = resume_latest_falls_back(run_dir, reference)
    assert "does not match its checksum" in warning


def test_a_changed_data_position_falls_back_to_the_older_step_and_finishes_exactly(runs, tmp_path):
    reference, template, _ = runs
    run_dir = copy_of(template, tmp_path)
    path = run_dir / "checkpoints" / "8" / "data" / "metadata"
    text = path.read_text()
    assert text.count('"skip_tokens": 1024') == 1
    path.write_text(text.replace('"skip_tokens": 1024', '"skip_tokens": 1025'))
    warning = resume_latest_falls_back(run_dir, reference)
    assert "data item does not match its checksum" in warning


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_resume_of_a_named_damaged_step_refuses_in_one_line(runs, tmp_path, damage):
    _, template, _ = runs
    run_dir = copy_of(template, tmp_path)
    path = largest_array_file(run_dir / "checkpoints" / "8")
    if damage == "flipped":
        flip_bytes(path, path.stat().st_size // 2)
    else:  # Orbax's failing reads print pages of noise on their own (into orbax_errors.log now)
        os.truncate(path, 100_000)
    out = run("train.py", "--resume", "8", "--runs-dir", str(run_dir.parent), "--run-id", run_dir.name,
              "--no-eval", expect=2)
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: checkpoint {run_dir}/checkpoints/8 is damaged")
    assert "--resume latest goes on from step 6" in line
    assert "Traceback" not in out.stdout + out.stderr and "Exception ignored" not in out.stdout + out.stderr
    assert (run_dir / "checkpoints" / "8").is_dir()  # a named step is never moved
    # (Orbax's noise, when its failing reads make any (it varies with timing), is in orbax_errors.log)


def test_status_names_a_save_cut_off_half_way_as_abandoned(runs, tmp_path):
    _, _, finished = runs
    run_dir = copy_of(finished, tmp_path)
    # what kill -9 during a save leaves: Orbax's tmp folder with part of the state, no commit file
    tmp = run_dir / "checkpoints" / "13.orbax-checkpoint-tmp-1796397600"
    shutil.copytree(run_dir / "checkpoints" / "12" / "state", tmp / "state")
    out = run("status.py", str(run_dir))
    assert "Checkpoint 13: abandoned (an unfinished save; the next resume removes it)" in out.stdout
    assert "saving 13" not in out.stdout


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder`` refuses new files, to root too: ``chattr +i`` as root, read-only permissions else."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("running as root without a file system that takes chattr +i")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        with pytest.raises(OSError):
            (folder / "probe").mkdir()
        yield
    finally:
        subprocess.run(undo, check=True)


def test_a_save_that_cannot_be_written_stops_the_run_in_one_line_and_it_resumes_exactly(runs, tmp_path):
    reference, template, _ = runs
    run_dir = copy_of(template, tmp_path)
    resume = ("--resume", "latest", "--runs-dir", str(run_dir.parent), "--run-id", run_dir.name, "--no-eval")
    # Each resumed run saves step 12 (its end) and fails. The timeout guards against Orbax's threads,
    # which wait about 300 s for a step folder that was never made.
    with unwritable(run_dir / "checkpoints"):
        folder = run("train.py", *resume, expect=2, timeout=240)
    # (a file size limit fails the writes as a full disk does: array files of a few MB, the run's
    # other files under 512 kB)
    full = run("train.py", *resume, expect=2, file_size_limit=512, timeout=240)
    for out, cause in ((folder, "Operation not permitted" if os.geteuid() == 0 else "Permission denied"),
                       (full, "File too large")):
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], out.stderr  # once, last
        assert lines[-1].startswith(f"error: saving a checkpoint to {run_dir / 'checkpoints'} failed: {cause}")
        assert f"stopped at step {STEPS}; complete checkpoints: [4, 5, 6, 8]" in lines[-1]
        assert "Traceback" not in out.stdout + out.stderr and "ERROR:absl" not in out.stderr
    end = json.loads((run_dir / "end.json").read_text())
    assert (end["state"], end["exit_code"]) == ("failed", 2)
    if list((run_dir / "checkpoints").glob(f"{STEPS}.orbax-checkpoint-tmp*")):  # the save the limit cut off
        assert "abandoned" in run("status.py", str(run_dir)).stdout
    # the causes gone, the run goes on from step 8 and ends bit for bit as the uninterrupted one
    run("train.py", *resume)
    final = stored_arrays(run_dir / "checkpoints" / str(STEPS))
    for name, x in reference.items():
        np.testing.assert_array_equal(final[name], x, err_msg=name)
