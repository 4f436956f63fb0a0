"""`vae evaluate` throughput (examples x k per second) and peak memory, end to end.

Full run (k=5000 on the whole test set of a trained run):

    /tmp/venv/bin/python bench/eval_speed.py --run outputs/DATE/TIME

Smoke test:  python bench/eval_speed.py --run /tmp/benchrun --k 10 --limit 50 --data-dir /tmp/benchdata

Runs `vae evaluate run=DIR k=K out=TMP.json estimators=E [limit=N] [data_dir=DIR]` once as a subprocess, timed
with perf_counter (start-up and model loading included). Peak memory is the child's max RSS from
resource.getrusage(RUSAGE_CHILDREN) (Linux reports KiB; shown in MiB). n is read from the JSON it writes.

Prints one markdown table row on stdout (the header goes to stderr, so rows append cleanly):

    | k | n | seconds | examples*k/s | peak RSS MB |
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder (holds checkpoints/last.ckpt)")
    p.add_argument("--k", type=int, default=5000)
    p.add_argument("--limit", type=int, default=None, help="first N test examples (default: all)")
    p.add_argument("--data-dir", default=None, help="dataset cache, if not where the run had it")
    p.add_argument("--estimators", default="iwae", help="vae evaluate's estimators= (default iwae: its throughput)")
    a = p.parse_args()

    exe = Path(sys.executable).with_name("vae")
    with tempfile.TemporaryDirectory(prefix="eval_speed-") as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [str(exe) if exe.exists() else "vae", "evaluate", f"run={a.run}", f"k={a.k}", f"out={out}",
               f"estimators={a.estimators}"]
        cmd += [f"limit={a.limit}"] if a.limit is not None else []
        cmd += [f"data_dir={a.data_dir}"] if a.data_dir is not None else []
        print("| k | n | seconds | examples*k/s | peak RSS MB |\n|---|---|---|---|---|", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"vae evaluate failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        n = json.loads(out.read_text())["n"]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the only child we ran
    print(f"| {a.k} | {n} | {seconds:.1f} | {n * a.k / seconds:,.0f} | {peak_mb:.0f} |")


if __name__ == "__main__":
    main()
