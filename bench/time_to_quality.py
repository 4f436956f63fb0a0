"""Time to quality: test log p(x) after a fixed training time, for the default and the presets.

    python bench/time_to_quality.py --minutes 30 60 --presets "" "experiment=conv_iwae"     # 2-core CPU
    python bench/time_to_quality.py --minutes 5 --parallel \
        --presets "" "model=conv" "experiment=conv_iwae" "experiment=ladder_iwae"          # one GPU

Each preset (overrides; "" is `vae train dataset=mnist` as it ships) trains for exactly that wall time
(Lightning's trainer.max_time, checked every step, with no epoch limit) and is then measured by
`vae evaluate` at its defaults: IWAE with k=5000 on all 10k test images, and the refined proposal
and AIS on the first 1000 (the most trustworthy estimate, README: What the numbers mean).
--parallel trains and evaluates all presets at once (on one GPU: they share it, so each had less
than a whole GPU); otherwise one after another. Prints one Markdown row per run; the runs and their
JSON stay under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from train_speed import device_name, vae_command  # bench/ is the script's folder, on sys.path


def hardware() -> str:
    """The GPU that vae train will pick, else the CPU model and its cores."""
    import torch

    return device_name("cuda" if torch.cuda.is_available() else "cpu")


def start(args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([*vae_command(), *args], stdout=f, stderr=subprocess.STDOUT)


def wait(procs: dict[str, subprocess.Popen], what: str) -> None:
    for name, p in procs.items():
        if p.wait() != 0:
            print(f"# {what} failed for {name!r} (exit {p.returncode}): see its .log", flush=True)


def row(name: str, minutes: float, run: Path, report: Path, hw: str) -> str:
    """One Markdown row: the preset, training, the test figures."""
    if not report.exists():
        return f"| `{name or 'default'}` | {minutes:g} min | {hw} | failed | | | | | |"
    m = json.loads((run / "metrics.json").read_text())
    r = json.loads(report.read_text())
    iwae = r["estimators"]["iwae"]
    best = r["log_px_estimator"]
    units = r.get("collapse", {})
    active = f"{units['active_units']}/{units['latent_dim']}" if "active_units" in units else "n/a"
    return (f"| `{name or 'default'}` | {minutes:g} min, {m['epoch']} epochs | {hw} | {m['val_elbo']:.2f} "
            f"| {iwae['log_px']:.2f} ± {iwae['log_px_se']:.2f} (k={r['k']}, n={iwae['n']}) | {r['log_px']:.2f} ({best}, n={r['log_px_n']}) "
            f"| {r['elbo']:.2f} | {r['gap']:.2f} | {active} |")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[5.0])
    p.add_argument("--presets", nargs="+", default=[""], help='overrides per run ("" for the default)')
    p.add_argument("--parallel", action="store_true", help="train (and evaluate) every run at once")
    p.add_argument("--out", type=Path, default=Path("outputs/time_to_quality") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    p.add_argument("--eval-args", nargs="*", default=[], help="extra vae evaluate overrides, e.g. limit=1000")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {hw}  out {a.out}  parallel {a.parallel}", flush=True)
    runs = {(preset, minutes): a.out / f"{(preset or 'default').replace('=', '-').replace(' ', '_')}-{minutes:g}min"
            for minutes in a.minutes for preset in a.presets}
    for phase in ("train", "evaluate"):
        procs: dict[str, subprocess.Popen] = {}
        for (preset, minutes), run in runs.items():
            seconds = round(minutes * 60)
            if phase == "train":
                args = ["train", "dataset=mnist", *preset.split(), "trainer.max_epochs=-1", "eval.k=0",
                        f"+trainer.max_time={{seconds: {seconds}}}", "trainer.enable_progress_bar=false",
                        f"hydra.run.dir={run}"]
            else:
                args = ["evaluate", f"run={run}", f"out={run}/evaluation.json", *a.eval_args]
            procs[str(run.name)] = start(args, run.parent / f"{run.name}.{phase}.log")  # names may hold dots
            if not a.parallel:
                wait(procs, phase)
                procs = {}
        wait(procs, phase)
        print(f"# {phase} done {time.strftime('%H:%M:%S')}", flush=True)
    print("| preset | training | hardware | val ELBO | test log p(x), IWAE | best estimate | test ELBO | gap | active units |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (preset, minutes), run in runs.items():
        print(row(preset, minutes, run, run / "evaluation.json", hw), flush=True)


if __name__ == "__main__":
    main()
