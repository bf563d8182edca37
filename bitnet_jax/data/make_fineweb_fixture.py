"""Builds FineWeb-Edu-shaped parquet files from the shared FineWeb-Edu text sample.

    python -m bitnet_jax.data.make_fineweb_fixture OUT.parquet [--shards K] [--csv PATH]

The ``text`` column holds real FineWeb-Edu documents (``fineweb_edu_text_sample/training_data.csv``
in ``$BITNET_TEST_DATA`` or ``../shared/data``). The other columns have FineWeb-Edu's names and
types (id, dump, url, file_path, language, language_score, token_count, score, int_score) but
placeholder values: the sample does not carry the real metadata. ``--shards K`` writes K files
``OUT-0000i-of-0000K.parquet`` (rows dealt out in order) for multi-file tests. Then train on it with
``--set data.data_files=OUT.parquet``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import uuid
from pathlib import Path

from bitnet_jax.data.errors import DataError

SAMPLE = Path("fineweb_edu_text_sample") / "training_data.csv"
COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count",
           "score", "int_score")


def default_csv() -> Path:
    roots = [os.environ.get("BITNET_TEST_DATA")] if os.environ.get("BITNET_TEST_DATA") else []
    roots.append(str(Path(__file__).resolve().parents[2].parent / "shared" / "data"))
    for root in roots:
        if (Path(root) / SAMPLE).is_file():
            return Path(root) / SAMPLE
    raise DataError(f"cannot find {SAMPLE} under $BITNET_TEST_DATA or ../shared/data; pass --csv PATH")


def read_texts(path: str | Path) -> list[str]:
    csv.field_size_limit(10**9)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "text" not in rows[0]:
        raise DataError(f"{path} has no 'text' column")
    return [r["text"] for r in rows]


def fineweb_table(texts: list[str]):
    """A pyarrow table with FineWeb-Edu's columns and types; placeholder metadata."""
    import pyarrow as pa

    n = len(texts)
    dumps = ("CC-MAIN-2013-20", "CC-MAIN-2019-35", "CC-MAIN-2024-10")
    return pa.table({
        "text": pa.array(texts, pa.string()),
        "id": pa.array([f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, t[:200])}>" for t in texts], pa.string()),
        "dump": pa.array([dumps[i % len(dumps)] for i in range(n)], pa.string()),
        "url": pa.array([f"https://example.org/fineweb-edu-sample/{i}" for i in range(n)], pa.string()),
        "file_path": pa.array([f"s3://commoncrawl/crawl-data/{dumps[i % len(dumps)]}/placeholder/{i:05d}.warc.gz"
                               for i in range(n)], pa.string()),
        "language": pa.array(["en"] * n, pa.string()),
        "language_score": pa.array([0.95] * n, pa.float64()),
        "token_count": pa.array([len(t.split()) for t in texts], pa.int64()),  # a word count, not GPT-2 tokens
        "score": pa.array([3.0] * n, pa.float64()),
        "int_score": pa.array([3] * n, pa.int64()),
    })


def write_fixture(out: str | Path, *, csv_path: str | Path | None = None, shards: int = 1,
                  rows: int | None = None, row_group_size: int = 32) -> list[Path]:
    """Writes the parquet file(s); returns their paths in stream order."""
    import pyarrow.parquet as pq

    texts = read_texts(csv_path or default_csv())[:rows]
    if not 1 <= shards <= len(texts):
        raise DataError(f"--shards {shards}: give between 1 and the number of documents ({len(texts)}), so "
                        "that every shard holds at least one")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        targets = [out]
    else:
        stem = out.name[: -len(".parquet")] if out.name.endswith(".parquet") else out.name
        targets = [out.with_name(f"{stem}-{i:05d}-of-{shards:05d}.parquet") for i in range(shards)]
    per = -(-len(texts) // shards)
    for i, target in enumerate(targets):
        pq.write_table(fineweb_table(texts[i * per:(i + 1) * per]), target, row_group_size=row_group_size)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output parquet path (with --shards, the name stem of the shards)")
    parser.add_argument("--csv", help="the FineWeb-Edu text sample CSV (default: the shared data)")
    parser.add_argument("--shards", type=int, default=1, help="number of parquet files to split the rows into")
    parser.add_argument("--rows", type=int, default=None, help="keep only the first N documents")
    args = parser.parse_args(argv)
    try:
        paths = write_fixture(args.out, csv_path=args.csv, shards=args.shards, rows=args.rows)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    files = args.out if args.shards == 1 else str(paths[0].parent / paths[0].name.replace("-00000-of-", "-*-of-"))
    print(f"train on it with: --set data.source=fineweb_edu --set data.data_files={files}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
