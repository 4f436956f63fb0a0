"""Start-up cost: `vae sample n=64 run=DIR out=TMP.png` end to end vs `python -c "import torch, torchvision"`.

Full run:

    /tmp/venv/bin/python bench/startup.py --run outputs/DATE/TIME

Smoke test:  python bench/startup.py --run /tmp/benchrun --repeats 1

Each command runs once untimed (warms the file cache), then --repeats times (default 5), each timed
with perf_counter around the subprocess; every `vae sample` writes a new PNG in a temp folder.
Prints each command's times and median, then the ratio of the medians (vae sample / import).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    t = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder (holds checkpoints/last.ckpt)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    exe = Path(sys.executable).with_name("vae")
    vae = str(exe) if exe.exists() else "vae"
    medians = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        commands = {
            "vae sample": lambda i: [vae, "sample", "n=64", f"run={a.run}", f"out={Path(tmp) / f'{i}.png'}"],
            "import torch, torchvision": lambda i: [sys.executable, "-c", "import torch, torchvision"],
        }
        for name, cmd in commands.items():
            seconds(cmd("warmup"))
            times = [seconds(cmd(i)) for i in range(a.repeats)]
            medians[name] = statistics.median(times)
            print(f"{name:26} median {medians[name]:6.2f} s   runs: {' '.join(f'{t:.2f}' for t in times)}", flush=True)
    print(f"ratio vae sample / import: {medians['vae sample'] / medians['import torch, torchvision']:.2f}")


if __name__ == "__main__":
    main()
