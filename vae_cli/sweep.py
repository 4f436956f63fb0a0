"""A Hydra callback that tabulates a sweep: each run's overrides, final val ELBO and test log p(x)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

COLUMNS = ("job", "overrides", "val_elbo", "test_elbo", "test_log_px", "test_gap", "step", "error", "folder")
FAILED = "error.txt"
JOBS = ".jobs"  # in the sweep folder: a note per job that ran in a folder of its own (a resumed run)


def record_failure(message: str) -> None:
    """Note in the current job's folder that it failed, and why (for the summary)."""
    from hydra.core.hydra_config import HydraConfig

    Path(HydraConfig.get().runtime.output_dir, FAILED).write_text(message + "\n")


def tidy(sweep_dir: Path, start: Path, kept: frozenset[Path] = frozenset()) -> None:
    """Remove what Hydra made for a sweep of a command that writes no run folder (`vae sample -m
    temperature=0.5,1`: the pictures go to the run's folder): the sweep folder's multirun.yaml and
    empty job folders, then the sweep folder and its parents up to ``start`` while they are empty,
    but for those in ``kept`` (resolved: the folders that were there before the sweep, empty or not).
    A job folder with anything in it (a failed job's error.txt) keeps the sweep folder as it is."""
    if not sweep_dir.is_dir() or any(p.is_file() or any(p.iterdir()) for p in sweep_dir.iterdir()
                                     if p.name != "multirun.yaml"):
        return
    for p in sweep_dir.iterdir():
        p.unlink() if p.is_file() else p.rmdir()
    from vae_cli.runs import remove_empty

    start, folder = start.resolve(), sweep_dir.resolve()  # up to start: an earlier sweep's folders keep a parent
    made = itertools.takewhile(lambda d: d not in kept, [folder, *folder.parents])
    remove_empty(d for d in made if start in d.parents)


def folders_there(sweep_dir: Path, start: Path) -> frozenset[Path]:
    """The sweep folder and its parents below ``start`` that exist already (resolved): ``tidy`` keeps them."""
    folder, start = sweep_dir.resolve(), start.resolve()
    return frozenset(d for d in [folder, *folder.parents] if start in d.parents and d.is_dir())


# (sweep folder, the command's folder, the folders there before) of a sweep under way (TidySweep)
_UNTIDY: list[tuple[Path, Path, frozenset[Path]]] = []
_LAUNCHED: dict[str, Any] = {}  # the last sweep launched from this process: its folder and start time (TidySweep)


def failed_jobs() -> int:
    """How many jobs of the last sweep launched here failed: the error.txt files they wrote in their
    folders since it began. A launcher such as joblib runs the jobs in processes of its own, whose
    counts this process never sees. Read once: the record goes with it."""
    folder, since = _LAUNCHED.pop("folder", None), _LAUNCHED.pop("since", 0.0)
    if folder is None or not folder.is_dir():
        return 0
    return sum(1 for p in folder.glob(f"*/{FAILED}") if p.stat().st_mtime >= since)


def tidy_pending() -> None:
    """``tidy`` the folders of the sweeps under way: at a sweep's end (TidySweep), or at a Ctrl-C during
    it (the CLI's interrupt), which Hydra ends with no callback."""
    while _UNTIDY:
        tidy(*_UNTIDY.pop())


class TidySweep(Callback):
    """At the end of a sweep of a command that writes no run folder (conf/from_run.yaml), or when it
    is interrupted (``tidy_pending``): ``tidy`` Hydra's default sweep folder. A callback, so it
    runs in the process that launched the jobs, whichever launcher ran them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_cli.checks import override_key

        given = any(override_key(o) == "hydra.sweep.dir" for o in config.hydra.overrides.hydra)
        cwd = Path(config.hydra.runtime.cwd)
        _LAUNCHED.update(folder=cwd / str(config.hydra.sweep.dir), since=time.time())
        if config.hydra.output_subdir is None and not given:  # a folder of the user's own is left as it is
            sweep_dir = cwd / str(config.hydra.sweep.dir)
            _UNTIDY.append((sweep_dir, cwd, folders_there(sweep_dir, cwd)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        tidy_pending()


def summarize(sweep_dir: Path, elsewhere: dict[Path, tuple[str, list[str]]] | None = None) -> list[dict[str, Any]]:
    """One row per finished run under sweep_dir (its subfolders with a metrics.json), by job number,
    and one per folder of ``elsewhere``: a job's folder outside it (-m resume=A,B), with the job's
    number and its own overrides (the run's saved ones are those it started with).

    ``overrides`` lists what differs between the runs (the overrides every run shares are left out).
    """
    rows, lists = [], []
    jobs = {p.parent.resolve(): (p.parent.name, None)
            for p in [*sweep_dir.glob("*/metrics.json"), *sweep_dir.glob(f"*/{FAILED}")]}
    jobs.update({run.resolve(): job for run, job in (elsewhere or {}).items()  # one row a folder, however named
                 if (run / "metrics.json").is_file() or (run / FAILED).is_file()})
    for run, (job, given) in jobs.items():
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        error = (run / FAILED).read_text().strip() if (run / FAILED).is_file() else None
        overrides_file = run / ".hydra" / "overrides.yaml"
        if given is None:
            given = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        lists.append(given)
        rows.append({"job": job, "folder": str(run), "error": error,
                     **{k: metrics.get(k) for k in ("val_elbo", "test_elbo", "test_log_px", "test_gap", "step")}})
    shared = set.intersection(*map(set, lists)) if len(lists) > 1 else set()
    for row, overrides in zip(rows, lists):
        row["overrides"] = " ".join(o for o in overrides if o not in shared)
    return sorted(rows, key=lambda r: (len(r["job"]), r["job"]))


def write_tables(rows: list[dict[str, Any]], sweep_dir: Path) -> tuple[Path, Path]:
    """summary.csv and summary.md in the sweep folder."""
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS[:-1]) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


_UNSUMMARIZED: list[Path] = []  # the folder of a `vae train` sweep under way (SweepSummary)


def summarize_pending() -> None:
    """At a Ctrl-C during a `vae train` sweep (the CLI's interrupt; Hydra ends it with no callback):
    the summary of the jobs that finished, which was written at the sweep's end only."""
    while _UNSUMMARIZED:
        sweep_dir = _UNSUMMARIZED.pop()
        rows = write_summary(sweep_dir)
        if rows:
            print(f"vae: the sweep's {len(rows)} ended job(s): {sweep_dir / 'summary.md'}", file=sys.stderr)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """summary.csv and summary.md of the sweep's finished jobs (its job folders, and those that a
    job's note in JOBS names elsewhere); their rows, none written where no job has finished."""
    notes = [json.loads(p.read_text()) for p in (sweep_dir / JOBS).glob("*.json")]
    rows = summarize(sweep_dir, {Path(n["folder"]): (n["job"], n["overrides"]) for n in notes})
    if rows:
        write_tables(rows, sweep_dir)
    return rows


def sweep_folder(config: DictConfig) -> Path:
    """The sweep's folder as Hydra makes it: from the command's folder (hydra.job.chdir=true moves a
    job's process into its own), with any .. taken out."""
    return Path(os.path.abspath(os.path.join(config.hydra.runtime.cwd, str(config.hydra.sweep.dir))))


class SweepSummary(Callback):
    """At the end of `vae train -m ...`: write and print the sweep's summary table (at a Ctrl-C, that
    of the jobs that finished: summarize_pending)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _UNSUMMARIZED.append(sweep_folder(config))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A resumed run's folder may hold an error.txt from an earlier sweep: this job writes its own
        Path(config.hydra.runtime.output_dir, FAILED).unlink(missing_ok=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A job whose folder is not the sweep's (-m resume=A,B trains in A and B) leaves a note of it
        in the sweep's JOBS folder: a file, since a launcher may run the job in another process."""
        # both as Hydra makes output_dir: from the command's folder (hydra.job.chdir=true has moved
        # this process into the job's), with any .. taken out
        folder = Path(os.path.abspath(config.hydra.runtime.output_dir))
        sweep_dir = sweep_folder(config)
        if config.hydra.mode == RunMode.MULTIRUN and folder.parent != sweep_dir:
            (sweep_dir / JOBS).mkdir(exist_ok=True)
            note = {"job": str(config.hydra.job.num), "folder": str(folder), "overrides": list(config.hydra.overrides.task)}
            (sweep_dir / JOBS / f"{config.hydra.job.num}.json").write_text(json.dumps(note))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _UNSUMMARIZED.clear()
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if not rows:
            return
        csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
        print(md_path.read_text() + f"sweep summary: {md_path} and {csv_path}", flush=True)
        failed = [r["job"] for r in rows if r["error"]]
        if failed:
            print(f"vae: error: {len(failed)} of {len(rows)} sweep jobs failed (job {', '.join(failed)}; "
                  "see the error column)", file=sys.stderr)
            sys.exit(2)
