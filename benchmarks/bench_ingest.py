"""Light-FMP preprocessing at scale: rows/s and peak RSS of the on-disk cache build against pandas' C parser.

    .venv/bin/python benchmarks/bench_ingest.py [--rows 1000000 4000000] [--chunksize 500000] [--min-count 1]
                                                [--dir DIR] [--keep]

For each size, writes a Criteo-layout TSV (label, 13 integer fields, 26 categorical fields of 8 hex digits) in
blocks of 250,000 rows (streaming: memory does not grow with the file), with the Criteo Kaggle set's
cardinalities (C3: 10.1 million values ... C9: 3) drawn with a Zipf-like skew (id = floor(card * u^4); at
45.8M rows that gives 30.5 million distinct values in all, Criteo has 33.8 million), its
missing rates (I1 45 %, I12 76 %, C22 76 %, ...), counts from a log-normal distribution, some negative I2 values,
and 25 % positive labels. Then, each in a fresh child process (the figure is the child's own ``ru_maxrss``):

* ``pandas``: ``pd.read_csv`` in chunks of ``--chunksize`` rows with the dtypes of the Criteo reader (numbers as
  float64, categories as strings), each chunk dropped: the C parser alone.
* ``preprocess``: ``CTRDataModule(format="criteo", cache_dir=..., min_count=...).setup()``: read (pyarrow's
  parser, one block of records at a time, field counts checked while parsing), raw columns, fit on the training
  split (80 %), encoding (:mod:`lightfmp.data.streaming`), from an empty cache. With ``min_count`` 1 every
  distinct value gets an id, so the vocabulary (held as Arrow strings, about 16 bytes a value) grows with the
  file; ``configs/criteo.yaml`` uses 10.

Prints one line per measurement and a summary with the goals of issue 15 (RSS at the largest size within 1.2x
of the smallest; preprocessing at least 0.5x pandas' rows/s) and the estimate for the full 45,840,617-row
Criteo file: time at the measured rate of the largest size, disk at its measured bytes per row, memory at the
largest size's peak plus its growth per distinct value times the growth in distinct values. The peak RSS is
also split into a fixed part and a part per distinct value (the line through the smallest and largest sizes:
all of the growth is charged to the distinct values, an upper bound on their cost).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CRITEO_ROWS = 45_840_617
#: Criteo Kaggle (train.txt) distinct values of C1..C26 and missing rates of I1..I13 and C1..C26
CARDINALITY = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
               5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # fmt: skip
MISSING_I = [0.45, 0.0, 0.21, 0.22, 0.03, 0.23, 0.04, 0.0, 0.04, 0.45, 0.04, 0.76, 0.22]
MISSING_C = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
             0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]  # fmt: skip
CRITEO_DISTINCT = sum(CARDINALITY)
BLOCK = 250_000
_HEX = np.array([list(f"{b:02x}".encode()) for b in range(256)], dtype=np.uint8)


def _hex8(x: np.ndarray) -> np.ndarray:
    """uint32 values as 8-character lowercase hex strings (vectorised)."""
    digits = _HEX[x.astype(">u4").view(np.uint8).reshape(-1, 4)].reshape(-1, 8)
    return digits.view("S8").ravel().astype("U8")


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """The Criteo-layout file described in the module docstring, written block by block."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        for start in range(0, rows, BLOCK):
            n = min(BLOCK, rows - start)
            cols: dict[str, object] = {"label": (rng.random(n) < 0.25).astype(np.int8)}
            for i, miss in enumerate(MISSING_I):
                v = np.floor(rng.lognormal(1.0 + 0.3 * i, 1.5, n)).astype(np.int64)
                if i == 1:
                    v -= rng.random(n) < 0.05
                col = pd.array(v, dtype="Int64")
                col[rng.random(n) < miss] = pd.NA
                cols[f"I{i + 1}"] = col
            for j, (card, miss) in enumerate(zip(CARDINALITY, MISSING_C)):
                ids = np.floor(card * rng.random(n) ** 4).astype(np.uint64)
                hashed = ((ids * np.uint64(2654435761) + np.uint64(97 * j + 1)) & np.uint64(0xFFFFFFFF)).astype(
                    np.uint32
                )
                text = _hex8(hashed).astype(object)
                text[rng.random(n) < miss] = ""
                cols[f"C{j + 1}"] = text
            pd.DataFrame(cols).to_csv(fh, sep="\t", header=False, index=False)


_PANDAS = """
import sys, time, json, resource
import numpy as np, pandas as pd
path, chunksize = sys.argv[1], int(sys.argv[2])
names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
dtype = {n: (np.float64 if n.startswith("I") else str) for n in names}
t = time.perf_counter(); rows = 0
for chunk in pd.read_csv(path, sep="\\t", header=None, names=names, dtype=dtype, chunksize=chunksize,
                         keep_default_na=False, na_values=[""], quoting=3):
    rows += len(chunk)
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

_PREPROCESS = """
import sys, time, json, resource
from pathlib import Path
from lightfmp.data.datamodule import CTRDataModule
path, chunksize, cache, min_count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
dm = CTRDataModule(format="criteo", path=path, chunksize=chunksize, cache_dir=cache, min_count=min_count,
                   progress=False)
dm.setup()
seconds = time.perf_counter() - t
root = dm.data_cache().root
disk = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file())
distinct = sum(json.loads((root / "meta.json").read_text())["distinct"].values())
print(json.dumps({"rows": len(dm.encoded), "seconds": seconds, "disk": disk, "distinct": distinct,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter; its last stdout line is a JSON dict of results."""
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--chunksize", type=int, default=500_000)
    parser.add_argument("--min-count", type=int, default=1, help="the preprocessing's min_count (1: every value)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the files (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and caches")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        path = root / f"criteo_{rows}.txt"
        t = time.perf_counter()
        if not path.exists():
            partial = path.with_name(path.name + ".partial")
            generate(partial, rows)
            partial.rename(path)  # a killed run leaves no file of the wrong length
        gen = time.perf_counter() - t
        size = path.stat().st_size
        pandas = child(_PANDAS, str(path), str(args.chunksize))
        cache = root / f"cache_{rows}"
        shutil.rmtree(cache, ignore_errors=True)
        pre = child(_PREPROCESS, str(path), str(args.chunksize), str(cache), str(args.min_count))
        if pandas["rows"] != rows or pre["rows"] != rows:
            raise RuntimeError(f"{path} holds {pandas['rows']} rows (preprocess: {pre['rows']}), expected {rows}")
        r = {
            "rows": rows,
            "file_mb": size / 2**20,
            "generate_s": gen,
            "pandas_rows_s": pandas["rows"] / pandas["seconds"],
            "pandas_rss_mb": pandas["peak_rss"] / 2**20,
            "pre_rows_s": pre["rows"] / pre["seconds"],
            "pre_s": pre["seconds"],
            "pre_rss_mb": pre["peak_rss"] / 2**20,
            "disk_mb": pre["disk"] / 2**20,
            "distinct": pre["distinct"],
        }
        results.append(r)
        print(
            f"{rows:>10,} rows ({r['file_mb']:.0f} MB): pandas read_csv {r['pandas_rows_s']:,.0f} rows/s, peak RSS "
            f"{r['pandas_rss_mb']:,.0f} MB | preprocess {r['pre_rows_s']:,.0f} rows/s ({r['pre_s']:.1f} s), peak RSS "
            f"{r['pre_rss_mb']:,.0f} MB, cache {r['disk_mb']:,.0f} MB, {r['distinct']:,} distinct values",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(cache, ignore_errors=True)
    small, big = results[0], results[-1]
    ratio = big["pre_rss_mb"] / small["pre_rss_mb"]
    speed = big["pre_rows_s"] / big["pandas_rows_s"]
    per_distinct = max(0.0, (big["pre_rss_mb"] - small["pre_rss_mb"]) / max(1, big["distinct"] - small["distinct"]))
    est_mem = big["pre_rss_mb"] + per_distinct * max(0, CRITEO_DISTINCT - big["distinct"])
    print(f"peak RSS {big['rows']:,} / {small['rows']:,} rows: {ratio:.2f}x (goal <= 1.2x)")
    fixed = small["pre_rss_mb"] - per_distinct * small["distinct"]
    print(
        f"peak RSS split: {fixed:,.0f} MB fixed + {per_distinct * 2**20:.0f} bytes per distinct value "
        f"({small['distinct']:,} distinct values at {small['rows']:,} rows, {big['distinct']:,} at {big['rows']:,})"
    )
    print(f"preprocess / pandas rows/s at {big['rows']:,} rows: {speed:.2f}x (goal >= 0.5x)")
    minutes = CRITEO_ROWS / big["pre_rows_s"] / 60
    disk = big["disk_mb"] / big["rows"] * CRITEO_ROWS / 1024
    print(
        f"estimate for Criteo's {CRITEO_ROWS:,} rows ({CRITEO_DISTINCT:,} distinct values): {minutes:.0f} min, "
        f"cache {disk:.1f} GiB, peak RSS {est_mem / 1024:.1f} GiB ({per_distinct * 2**20:.0f} bytes per extra "
        "distinct value)"
    )
    if not args.keep and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
