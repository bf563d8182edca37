"""``status.py RUN_DIR``: a training run's progress, metrics, ETA, evals, samples and checkpoints.

Reads the run directory's files only (config.yaml, tb/ event files, checkpoints/, samples.jsonl,
anomalies/, end.json) and never talks to the trainer, so it works on a live run, a finished one and
a dead one alike. By purpose:

- ``run``: the run directory's files, read incrementally (``Run``); ``run_config``: config.yaml;
- ``report``: what the numbers are, ``build_status(run)`` (the ``--json`` output);
- ``text``: ``format_text``, the human report;  ``plot``: ``plot_run``, the curves as a PNG;
- ``cli``: ``main``, the command line (``status.py``, ``bitnet-status``, ``python -m bitnet_jax.status``).

Importing it never imports jax.
"""

from bitnet_jax.status.cli import main, parse_args
from bitnet_jax.status.plot import PlotUnavailable, plot_run, smooth
from bitnet_jax.status.report import STAGE_NAMES, build_status
from bitnet_jax.status.run import Run, RunDirError, check_run_dir
from bitnet_jax.status.text import format_text
from bitnet_jax.units import format_duration

__all__ = ["PlotUnavailable", "Run", "RunDirError", "STAGE_NAMES", "build_status", "check_run_dir",
           "format_duration", "format_text", "main", "parse_args", "plot_run", "smooth"]
