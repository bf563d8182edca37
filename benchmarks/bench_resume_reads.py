"""How often a resume reads each step's files: call counts of the run-directory and restore helpers
during a real ``train.py --resume`` of a real run directory (two complete steps on disk).

    .venv/bin/python benchmarks/bench_resume_reads.py

Trains a tiny run to ``--stop-at 7`` in a subprocess (steps 5 and 7 on disk), then resumes it
in this process for one step with the helpers wrapped, and prints a table: calls per helper, and
opens of each step's ``meta/metadata`` file (an audit hook sees every open by Python code,
Orbax's included).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETS = ["train.steps=20", "optim.warmup_steps=2", "checkpoint.every=5", "checkpoint.keep_last=2",
        "eval.every=0", "log.metrics_every=0", "log.samples_every=0", "log.progress=false"]
HELPERS = ("inspect_step", "scan_steps", "complete_steps", "read_meta", "read_config", "check_meta",
           "config_of", "_parse_json", "check_shapes", "abstract_state", "from_dict")


def _wrap_everywhere(name: str, counts: collections.Counter) -> None:
    """Replaces every bitnet_jax module's binding of the function ``name`` by a counting wrapper."""
    originals = {}
    for mod in list(sys.modules.values()):
        fn = getattr(mod, name, None) if (getattr(mod, "__name__", "") or "").startswith("bitnet_jax") else None
        if callable(fn) and getattr(fn, "__module__", "").startswith("bitnet_jax"):
            originals.setdefault(id(fn), fn)
    wrappers = {}
    for key, fn in originals.items():
        def counted(*args, _fn=fn, **kwargs):
            counts[name] += 1
            return _fn(*args, **kwargs)
        wrappers[key] = counted
    for mod in list(sys.modules.values()):
        if (getattr(mod, "__name__", "") or "").startswith("bitnet_jax"):
            fn = getattr(mod, name, None)
            if fn is not None and id(fn) in wrappers:
                setattr(mod, name, wrappers[id(fn)])


def main() -> int:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        sets = [a for s in SETS for a in ("--set", s)]
        subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
                        *sets, "--runs-dir", tmp, "--run-id", "r", "--stop-at", "7", "--no-eval"],
                       env=env, check=True, capture_output=True, cwd=REPO)
        run_dir = Path(tmp) / "r"
        steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        os.environ.update(JAX_PLATFORMS="cpu")
        import bitnet_jax.checkpoint, bitnet_jax.config, bitnet_jax.resume, bitnet_jax.train_cli  # noqa: E401,F401
        import bitnet_jax.train_state  # noqa: F401
        for extra in ("bitnet_jax.run_dir",):
            try:
                __import__(extra)
            except ImportError:
                pass
        counts: collections.Counter = collections.Counter()
        for name in HELPERS:
            _wrap_everywhere(name, counts)
        opens: collections.Counter = collections.Counter()
        active = [True]  # an audit hook cannot be removed: it stops counting after the resume

        def audit(event, args):
            if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
                p = Path(os.fsdecode(args[0]))
                if p.name == "metadata" and p.parent.name == "meta":
                    opens[p.parent.parent.name] += 1

        sys.addaudithook(audit)
        code = bitnet_jax.train_cli.main(["--resume", str(run_dir), "--stop-at", "8", "--no-eval"])
        active[0] = False
        assert code == 0
        print(f"steps on disk before the resume: {steps}")
        print(f"{'helper':<16} calls")
        for name in HELPERS:
            print(f"{name:<16} {counts[name]:>5}")
        for step in steps:
            print(f"meta/metadata of step {step} opened {opens[step]} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
