"""Merges the per-row JSON files of ``benchmarks/gpu_bench.sh`` (one ``bench_train.py --json`` per
process, so that each row's peak device memory is its own) into one table, the ratios, the memory
check and the time breakdown, and writes the kept results file
``<results-dir>/gpu-<device>-<date>.json``:

    {"device": "<nvidia-smi name>", "jax": "<version>", "date": "YYYY-MM-DD", "config": ...,
     "rows": [{"name", "tokens_per_sec", "step_ms", "mfu", "peak_mem_gib", ...}],
     "ratios": {...}, "breakdown_ms": {...}, "int8_dot": "...", "failures": [...]}

    python3 benchmarks/gpu_report.py ROW.json... --device "NVIDIA H200" [--results-dir DIR] [--md FILE]
        [--copy-to DIR] [--note TEXT]

Needs no jax: it reads files only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (its module level needs numpy only)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="*", help="bench_train.py --json files, one per row, in the table's order")
    p.add_argument("--device", help="device name for the results (default: the rows' device kind)")
    p.add_argument("--date", help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--md", help="also write the tables (Markdown) to this file")
    p.add_argument("--copy-to", help="also write the results file into this folder (the device's $OUT)")
    p.add_argument("--note", action="append", default=[], help="a line kept in the results (repeatable)")
    return p.parse_args(argv)


def slug(text: str) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def merge(files: list[dict]) -> dict:
    """The rows of every file in order, the failures of all, and the first profile's breakdown."""
    rows, failures, out = [], [], {}
    for data in files:
        rows += [bench_train.Result(**r) for r in data.get("rows", [])]
        failures += data.get("failures", [])
        for key in ("jax", "device_kind", "config", "tokens_per_step", "flops_per_token", "peak_flops_per_device",
                    "total_steps"):
            if data.get(key) is not None:
                out.setdefault(key, data[key])
        if "breakdown_ms" in data and "breakdown_ms" not in out:
            out.update(breakdown_ms=data["breakdown_ms"], breakdown_scopes_ms=data.get("profile_ms", {}),
                       profiled=data.get("profiled"))
    out.update(rows=rows, failures=failures)
    return out


def results(merged: dict, device: str, date: str, notes: list[str]) -> dict:
    """The kept JSON: the issue's row keys first, then what else each row measured."""
    rows = []
    for r in merged["rows"]:
        row = {"name": r.name, "tokens_per_sec": r.tokens_per_s, "step_ms": r.step_ms, "mfu": r.mfu,
               "peak_mem_gib": r.peak_mem_gib}
        row.update({k: v for k, v in dataclasses.asdict(r).items() if k not in ("name", "tokens_per_s", "step_ms",
                                                                                  "mfu", "peak_mem_gib")})
        rows.append(row)
    int8 = [r.int8_dot for r in merged["rows"] if r.int8_dot]
    keys = ("jax", "config", "tokens_per_step", "flops_per_token", "peak_flops_per_device")
    return {"device": device, "date": date, **{k: merged.get(k) for k in keys}, "rows": rows,
            "ratios": bench_train.ratios(merged["rows"]), "breakdown_ms": merged.get("breakdown_ms", {}),
            "breakdown_scopes_ms": merged.get("breakdown_scopes_ms", {}), "profiled": merged.get("profiled"),
            "int8_dot": int8[0] if int8 else None, "failures": merged["failures"], "notes": notes}


def report(kept: dict, total_steps: int) -> str:
    """The tables and lines gpu_bench.sh prints last (and writes to --md)."""
    rows = [bench_train.Result(**{("tokens_per_s" if k == "tokens_per_sec" else k): v for k, v in r.items()})
            for r in kept["rows"]]
    parts = [f"## {kept['device']}, jax {kept['jax']}, {kept['config']}, {kept['date']}", "",
             bench_train.format_table(rows, None, total_steps), ""]
    if kept["ratios"]:
        parts += [bench_train.format_ratios(kept["ratios"]), ""]
    ours = [r for r in rows if r.tags.get("framework") == "bitnet-jax"]
    if ours:
        parts += ["Device memory, GiB (the dry run's estimate beside what was measured):", "",
                  bench_train.format_memory(ours), ""]
    if kept["int8_dot"]:
        parts += [f"int8 products in the compiled HLO: {kept['int8_dot']}", ""]
    if kept["breakdown_ms"]:
        parts += [f"Step time by category (GPU kernel time per step, {kept['profiled']}):", "",
                  bench_train.format_breakdown(kept["breakdown_ms"]), ""]
    for f in kept["failures"]:
        parts.append(f"FAILED {f}")
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    files = []
    for path in args.rows:
        try:
            files.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:  # a row that died before writing: reported, not fatal
            files.append({"failures": [f"{path}: no results ({type(e).__name__}: {e})"]})
    merged = merge(files)
    if not merged["rows"]:
        print("gpu_report: no row was measured; see the log above", file=sys.stderr)
        return 1
    device = args.device or merged.get("device_kind") or "unknown"
    date = args.date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    kept = results(merged, device, date, args.note)
    out = Path(args.results_dir) / f"gpu-{slug(device)}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(kept, indent=2) + "\n")
    if args.copy_to:
        (Path(args.copy_to) / out.name).write_text(out.read_text())
    text = report(kept, merged.get("total_steps") or 60000)
    print(text)
    print(f"results: {out}")
    if args.md:
        Path(args.md).write_text(text)
    return 1 if kept["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
