"""The command line: ``status.py RUN_DIR [--json] [--plot FILE.png] [--watch SECONDS] [--stale-after SECONDS]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bitnet_jax.status.plot import PlotUnavailable, plot_run
from bitnet_jax.status.report import ENDED_STATES, MIN_STALE_S, START_WINDOW_S, STALE_STEP_TIMES, build_status
from bitnet_jax.status.run import Run, RunDirError
from bitnet_jax.status.text import format_text


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="status.py",
        description="Summarise a training run from its files (never talks to the trainer).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, runs/<run_id>/")
    p.add_argument("--json", action="store_true", help="print the report as JSON (keys: see README)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw loss, eval loss, LR and WD to this PNG (matplotlib)")
    p.add_argument("--watch", metavar="SECONDS", type=_positive_float,
                   help="refresh every SECONDS until the trainer exits: finished, halted, stopped or failed "
                        "(reads only new bytes)")
    p.add_argument("--stale-after", metavar="SECONDS", type=_positive_float,
                   help=f"call the run stale after this long without a new event (default: "
                        f"{STALE_STEP_TIMES} median step times plus the longest eval/sample hook, at least "
                        f"{MIN_STALE_S:.0f} s; before the first step: {START_WINDOW_S:.0f} s, after which a run "
                        "with no step and no checkpoint is 'not started')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run = Run(args.run_dir)
    except RunDirError as e:
        print(f"status.py: error: {e}", file=sys.stderr)
        return 2
    clear = args.watch and not args.json and sys.stdout.isatty()
    rc = 0
    plot = args.plot
    try:
        while True:
            try:
                run.refresh()
            except RunDirError as e:
                print(f"status.py: error: {e}", file=sys.stderr)
                return 2
            st = build_status(run, stale_after=args.stale_after)
            if args.json:
                out = json.dumps(st, indent=None if args.watch else 2, allow_nan=False)
            else:
                out = format_text(st)
            if clear:
                out = "\033[H\033[2J" + out
            print(out, flush=True)
            if plot:
                try:
                    plot_run(run, st, plot)
                except PlotUnavailable as e:
                    print(f"status.py: error: {e}", file=sys.stderr)
                    rc, plot = 1, None
            if not args.watch or st["state"] in ENDED_STATES:
                return rc
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return rc
    except BrokenPipeError:  # e.g. status.py RUN | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return rc
