"""Runs and checkpoints: find the run, load its checkpoint safely, rebuild the model, name outputs.

A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)``, which unpickles
tensors and plain containers only and runs no code from the file. The model is rebuilt from the
resolved config stored in the checkpoint itself (``checkpoint["vae_cli"]["config"]``), so a
checkpoint copied anywhere still loads.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from pydantic import AfterValidator, BaseModel

from vae_cli.errors import UserError, first_line, no_access
from vae_cli.logs import log
from vae_cli.run_config import TrainSettings
from vae_cli.settings import TARGETS, check_untrusted, register_resolvers, show
from vae_cli.sources import why_unreadable
from vae_cli.typed import STRICT, MatmulPrecision, Seed, Text

OUTPUTS = Path("outputs")
Split = Literal["test", "val", "train"]


def _device_here(value: str) -> str:
    """cpu, auto, or cuda / cuda:N where such a GPU is visible."""
    import re

    ok = re.fullmatch(r"cpu|auto|cuda(:\d+)?", value) is not None
    if ok and value.startswith("cuda"):
        index = int(value.split(":")[1]) if ":" in value else 0
        ok = torch.cuda.is_available() and index < torch.cuda.device_count()
    if not ok:
        raise ValueError(f"expected cpu, auto, or cuda / cuda:N where such a GPU is visible "
                         f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} here)")
    return value

# A checkpoint's config is untrusted too: rebuilding the model from it with Hydra's instantiate
# could call any importable function. Its structure is checked first (depth, text keys, no
# interpolations, no Hydra keys but _target_/_partial_, only vae_cli.settings.TARGETS), then every
# value against the description `vae train` checks its own settings with (run_config.TrainSettings).
SAFE_TARGETS = set(TARGETS)


def check_config(config: Any, source: str) -> dict[str, Any]:
    """The run config of a checkpoint or run folder, if it is a valid `vae train` config; else a UserError."""
    if not isinstance(config, dict):
        raise UserError(f"{source} is not a vae-cli checkpoint (it holds no config)")
    return check_untrusted(config, TrainSettings, source)


class FromRunSettings(BaseModel):
    """What every command that reads a trained model shares (conf/from_run.yaml)."""

    model_config = STRICT
    run: Text | None = None       # a run folder; with neither run nor ckpt, the newest run
    ckpt: Text | None = None      # a checkpoint file
    out: Text | None = None       # the output file; default: a new numbered file in the run folder
    seed: Seed = 0
    device: Annotated[str, AfterValidator(_device_here)] = "auto"   # auto: the GPU when there is one
    matmul_precision: MatmulPrecision = "highest"


class FromDataSettings(FromRunSettings):
    """What the commands that read images of the run's dataset add (conf/from_data.yaml)."""

    data_dir: Text | None = None  # where the dataset cache lives, if not where the run had it
    split: Split = "test"


def _missing(path: Path) -> str:
    return " (it does not exist)" if not path.exists() else ""


def last_checkpoint(run_dir: str | Path) -> Path:
    """run_dir/checkpoints/last.ckpt, or a UserError saying what is missing."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"run={str(run_dir)!r} is not a folder{_missing(run)}: give a run folder under outputs/")
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"run={str(run_dir)!r} has no checkpoints/last.ckpt: is it a `vae train` run folder?")
    return ckpt


_HELD: dict[Path, tuple[Any, list[Path]]] = {}  # claimed before Hydra started (claim_run_folder): lock, folders made


def claim_run_folder(run: Path, shown: str) -> None:
    """Take run_lock's lock on a new run folder now, before Hydra writes its .hydra/ there, and hold it
    until the process ends: of two `vae train` started into one folder at once, the second is
    refused before it writes anything (it had overwritten the first one's saved config)."""
    run = run.resolve()
    made = list(itertools.takewhile(lambda d: not d.exists(), [run, *run.parents]))
    lock = run_lock(run, shown)
    lock.__enter__()  # released by the system when the process ends
    _HELD[run] = (lock, made)


def drop_claims() -> None:
    """Ctrl-C before Hydra wrote into a claimed folder: the empty train.log goes, and the folders the
    claim made (else the folder would be taken for a run: "holds a run already")."""
    for run, (_, made) in _HELD.items():
        log_file = run / "train.log"
        if (run / ".hydra").exists() or not log_file.is_file() or log_file.stat().st_size:
            continue  # the run has begun: its own interrupt handling keeps what it needs
        log_file.unlink()
        remove_empty(made)


@contextmanager
def run_lock(run: Path, shown: str) -> Iterator[None]:
    """Hold the run folder for one `vae train`: an advisory lock on RUN/train.log (the file every
    run writes; its text is not touched), which the system drops when the process ends, however it
    ends. A second training into the same folder, such as resume=RUN while RUN still trains, is
    refused instead of writing the same checkpoints and events at once. Lightning's other DDP
    processes (rank > 0) train in rank 0's folder, under its lock."""
    if not first_process() or run.resolve() in _HELD:  # rank 0's folder; or claimed by this process already
        yield
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    try:
        run.mkdir(parents=True, exist_ok=True)
        f = open(run / "train.log", "a")
    except OSError as e:  # a run folder of someone else's, made read-only, or on a read-only mount: said before any work
        if not no_access(e):
            raise
        raise UserError(_cannot_write(shown, e.filename or run, (e.strerror or "permission denied").lower())) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{shown}: that run is being trained now by another `vae train`: wait for it to end, "
                            "or stop it first") from None
        except OSError as e:  # a file system without flock (some NFS, Lustre, FUSE mounts): go on unguarded
            log.debug(f"no lock on {run / 'train.log'} ({_problem(e)}): a second training there is not refused")
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# The process's rank, as the launchers Lightning runs under set it (torchrun, Lightning's own, Slurm, LSF).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _cannot_write(shown: str, what: object, why: str) -> str:
    """The line for a run folder that training cannot write (why: "permission denied", "read-only
    file system", ...), with the way on: access to give where there is any; for resume=, a copy."""
    first = "" if why.startswith("read-only") else "give yourself access, or "
    way = "copy the run folder to where you can write and resume the copy" if shown.startswith("resume=") else \
        "train elsewhere (hydra.run.dir=...)"
    return f"{shown}: cannot write {what} ({why}): training needs write access to its run folder; {first}{way}"


def _not_writable(folder: Path) -> str | None:
    """Why training could not write in an existing folder ("read-only file system", "permission denied"), or None."""
    if os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def first_process() -> bool:
    """Not one of the other processes of a multi-process training (they share rank 0's folder)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in _RANK_VARIABLES)


def check_not_training(run: Path, shown: str) -> None:
    """UserError now if another `vae train` holds the run folder (run_lock): said before any work."""
    if (run / "train.log").is_file():
        with run_lock(run, shown):
            pass


def resume_source(run_dir: str | Path) -> tuple[dict[str, Any], Path | None]:
    """(config, last checkpoint) to resume a run; a run killed before its first checkpoint
    restarts from step 0 with the config Hydra saved in RUN/.hydra/config.yaml."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"resume={str(run_dir)!r} is not a folder{_missing(run)}: give a run folder under outputs/")
    for folder in (run, run / "checkpoints", run / "tensorboard"):  # where training writes: said before it trains
        why = _not_writable(folder) if folder == run or folder.is_dir() else None
        if why:
            raise UserError(_cannot_write(f"resume={str(run_dir)}", f"in {folder}", why))
    check_not_training(run, f"resume={str(run_dir)}")
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():  # a second Ctrl-C between the two writes, say: the newest checkpoint it holds
        ckpt = newest_kept(run / "checkpoints") or ckpt
    saved = run / ".hydra" / "config.yaml"
    if ckpt.is_file() and not os.access(ckpt, os.R_OK):  # a good file, most likely: nothing to copy over it
        raise UserError(f"resume={str(run_dir)!r}: its checkpoints/{ckpt.name} cannot be read (permission denied): "
                        "give yourself read access to it")
    if ckpt.is_file():
        try:
            config = load_checkpoint(ckpt)["vae_cli"]["config"]
        except UserError as e:  # named as the run's file (the user gave no ckpt=), with a way on
            other = newest_kept(ckpt.parent) if ckpt.name == "last.ckpt" else None
            way = f"copy {other.name} over it to continue from there" if other else "remove it to start over from step 0"
            why = str(e).replace(f"ckpt={str(ckpt)!r} ", "", 1)
            raise UserError(f"resume={str(run_dir)!r}: its checkpoints/{ckpt.name} {why}: {way}") from None
        if saved.is_file():
            _check_same_run(run_dir, config, _saved_config(run_dir, saved, resolve=False), ckpt.name)
        return config, ckpt
    if not saved.is_file():
        raise UserError(f"resume={str(run_dir)!r} has neither checkpoints/last.ckpt nor .hydra/config.yaml: "
                        "is it a `vae train` run folder?")
    return check_config(_saved_config(run_dir, saved), f"resume={str(run_dir)!r}"), None


def newest_kept(folder: Path) -> Path | None:
    """The checkpoint of the most steps in a run's checkpoints/ (by Lightning's step=N in its name),
    last.ckpt left out; None where there is none."""
    steps = {}
    for path in folder.glob("*.ckpt") if folder.is_dir() else []:
        found = re.search(r"step=(\d+)", path.name)
        if path.name != "last.ckpt" and found and path.is_file():
            steps[path] = int(found.group(1))
    return max(steps, key=steps.get) if steps else None


def _saved_config(run_dir: str | Path, saved: Path, resolve: bool = True) -> Any:
    """RUN/.hydra/config.yaml, resolved (or as written, its ${...} left as text: for a comparison that
    must not depend on this shell's environment); None for a file unreadable when it is only compared."""
    from omegaconf import OmegaConf

    register_resolvers()
    try:
        return OmegaConf.to_container(OmegaConf.load(saved), resolve=resolve)
    except Exception as e:
        if not resolve:
            return None
        raise UserError(f"resume={str(run_dir)!r}: its .hydra/config.yaml cannot be read ({first_line(e)})") from None


# Not judged: resume (null in the run's own config), and paths, which the checkpoint holds as they were
# made absolute when the run started (a folder dataset's; any given relatively under hydra.job.chdir=true)
# and .hydra/config.yaml as they were given.
NOT_COMPARED = {"resume", "data_dir", "dataset.path", "dataset.data_dir"}


def _check_same_run(run_dir: str | Path, config: dict[str, Any], saved: Any, name: str = "last.ckpt") -> None:
    """Refuse a last.ckpt whose config differs from the run's own: a checkpoint of another run, copied
    in. Resumed, it had trained that model on that checkpoint's data and trainer settings (its
    dataset, its epochs, its eval), and metrics.json mixed both runs. Where the two differ in the keys
    they hold (one written by another version), or the run's file holds a ${...}, nothing is judged."""
    def difference(a: Any, b: Any, at: str) -> str | None:
        if at in NOT_COMPARED:
            return None
        if isinstance(a, dict) and isinstance(b, dict):
            return next((d for k in a if k in b and (d := difference(a[k], b[k], f"{at}.{k}"))), None)
        if isinstance(b, str) and "${" in b:  # resolved when the run started (an env var, another key): not judged
            return None
        return None if a == b else f"{at} is {show(a)} there, {show(b)} in .hydra/config.yaml"

    if not isinstance(saved, dict):
        return
    for key in [k for k in config if k in saved]:
        found = difference(config[key], saved[key], key)
        if found:
            raise UserError(f"resume={str(run_dir)!r}: its checkpoints/{name} is not this run's ({found}): put "
                            f"the run's own {name} back, or train a new run")


def newest_run(root: str | Path = OUTPUTS) -> Path:
    """The run under root (searched recursively, sweeps included) whose last.ckpt was written last."""
    ckpts = list(Path(root).glob("**/checkpoints/last.ckpt"))
    if not ckpts:
        raise UserError(f"no trained run under {str(root)!r}: train one with `vae train`, or give run=DIR or ckpt=FILE")
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns).parent.parent


def find_checkpoint(run: str | None, ckpt: str | None) -> Path:
    """ckpt=FILE, else run=DIR's last checkpoint, else the newest run's."""
    if ckpt is not None and run is not None:
        raise UserError(f"run={run!r} and ckpt={ckpt!r}: give one of them")
    if ckpt is not None:
        path = Path(ckpt).expanduser()
        if path.is_dir():
            raise UserError(f"ckpt={ckpt!r} is a folder: give a .ckpt file written by `vae train` "
                            "(or run=FOLDER for a run)")
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise UserError(f"ckpt={ckpt!r} {what}: give a .ckpt file written by `vae train`")
        return path
    return last_checkpoint(run) if run is not None else last_checkpoint(newest_run())


def _finite(value: object) -> bool:
    """No NaN or infinity in a floating tensor: its minimum and maximum are finite (one pass, no mask)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
        return True
    low, high = torch.aminmax(value.detach().float() if value.dtype in (torch.float16, torch.bfloat16) else value)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a vae-cli checkpoint without running code from it; UserError if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # a good file the user may not read is no damaged one
        raise UserError(f"ckpt={str(path)!r} cannot be read ({(e.strerror or 'permission denied').lower()}): "
                        "give yourself read access to it, or use another checkpoint") from None
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError for non-zip files, ...
        raise UserError(f"ckpt={str(path)!r} is not a vae-cli checkpoint ({why_unreadable(Path(path), e)})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("vae_cli"), dict) and isinstance(ckpt.get("state_dict"), dict)):
        raise UserError(f"ckpt={str(path)!r} is not a vae-cli checkpoint (it holds no vae-cli config)")
    check_config(ckpt["vae_cli"].get("config"), f"ckpt={str(path)!r}")
    bad = [k for k, v in ckpt["state_dict"].items() if not _finite(v)]
    if bad:  # vae train stops before it saves a model whose loss went non-finite: a damaged or foreign file
        raise UserError(f"ckpt={str(path)!r} holds non-finite weights (NaN or infinity in {len(bad)} tensor(s), "
                        f"first {bad[0]}): nothing can be computed from it; use another checkpoint")
    return ckpt


def build_model(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None):
    """Rebuild the VAE from a run's resolved config, and load its weights when given."""
    from hydra.utils import instantiate

    model = instantiate(config["model"])
    if state_dict is not None:
        prefix = "model."
        model.load_state_dict({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)})
    return model.eval()


def load_model(run: str | None = None, ckpt: str | None = None, device: str = "cpu"):
    """(model, config, checkpoint path) for run=/ckpt=/newest-run, ready for inference."""
    path = find_checkpoint(run, ckpt)
    checkpoint = load_checkpoint(path)
    config = checkpoint["vae_cli"]["config"]
    try:
        model = build_model(config, checkpoint["state_dict"])
    except Exception as e:
        raise UserError(f"ckpt={str(path)!r} could not be rebuilt into a model ({first_line(e.__cause__ or e, 160)})") from None
    warn_if_diverged(checkpoint, path)
    model.trained_data = checkpoint["vae_cli"].get("data")  # a folder's split digests (vae_cli.data.run_split)
    return model.to(device), config, path


def warn_if_diverged(checkpoint: dict[str, Any], path: Path) -> None:
    """One warning when the checkpoint's model is one its run diverged to (vae_cli.collapse.DivergenceMonitor):
    its val ELBO far below the run's best. Name the best checkpoint."""
    from vae_cli.collapse import DivergenceMonitor

    state = checkpoint["vae_cli"].get("divergence")
    if not isinstance(state, dict):  # saved before the monitor existed
        return
    watch = DivergenceMonitor()
    watch.load_state_dict(state)
    numbers = (watch.best, watch.last, watch.best_epoch, watch.diverged_epoch)
    if not all(isinstance(v, (int, float)) for v in numbers):  # never fell (None), or not ours: nothing to say
        return
    if not watch.fallen(watch.last):  # recovered
        return
    best = watch.best_checkpoint
    at = "of the untrained model" if watch.best_epoch == watch.UNTRAINED else f"at epoch {watch.best_epoch}"
    keep = f"; the best model: ckpt={best}" if isinstance(best, str) and best.isprintable() else ""
    log.warning(f"ckpt={str(path)!r} holds a model its run diverged to: val ELBO {watch.last:.4g}, against "
                f"{watch.best:.2f} {at} (it fell at epoch {watch.diverged_epoch}){keep}")


def pick_device(device: str) -> torch.device:
    """``auto`` is the GPU when there is one."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_matmul_precision(precision: str) -> None:
    """torch's float32 matmul precision, set before any model is built or run.

    'highest' (the default) keeps float32 matmuls exact; 'high' / 'medium' let a GPU with Tensor
    Cores use TF32 / bf16 inside them. Setting it is also the answer to Lightning's Tensor Cores
    advice. Estimators that sum in float64 (log p(x)) keep doing so whatever is chosen here.
    """
    torch.set_float32_matmul_precision(precision)


def run_dir_of(ckpt_path: Path) -> Path:
    """The run folder of a checkpoint: the parent of checkpoints/, else the checkpoint's own folder."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def _problem(error: OSError) -> str:
    """An OSError as a few words: 'Permission denied', 'Not a directory', ..."""
    return error.strerror or first_line(error)


def check_out(out: str | None, gif: bool = False, suffixes: tuple[str, ...] = (".png",)) -> None:
    """Refuse, before any work, an out=FILE that exists or whose folder does not exist, is a file
    or cannot be written (a GIF goes beside the PNG; suffixes: the outputs, out= names the first)."""
    if out is None:
        return
    path = Path(out).expanduser()
    _check_out_name(out, path, (*suffixes, ".gif") if gif else suffixes)  # out=a.gif with gif=true: name the PNG
    for p in [path, beside(path, ".gif", suffixes)] if gif else [path]:
        if p.exists():
            raise UserError(f"out={out!r}: {str(p)!r} exists already; choose a new name (nothing was overwritten)")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise UserError(f"out={out!r}: {str(folder)!r} is a file, not a folder")
    if not folder.is_dir():
        raise UserError(f"out={out!r}: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"out={out!r}: the folder {str(folder)!r} is not writable")


def claim_outputs(out: str | None, default_dir: Path, stem: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Create the output files exclusively (empty), so nothing is ever overwritten, even by a command
    running at the same time: out=FILE (and FILE with the other suffixes), or by default
    default_dir/stem-NNN.suffix with the first NNN free for every suffix.

    Claim BEFORE the expensive work, so that a bad output path fails in one line at once, and
    release the claim if the work fails; ``claimed_outputs`` does both::

        with claimed_outputs(cfg.out, run_dir_of(ckpt) / "eval", stem, (".json",)) as (path,):
            result = expensive_work()          # a failure or Ctrl-C here removes the claimed files
            path.write_text(json.dumps(result))

    Any OSError (the default folder is a file, out='s folder is unwritable or a file, a full disk)
    is a one-line UserError naming the path and the problem.
    """
    if out is not None:
        base = Path(out).expanduser()
        _check_out_name(out, base, suffixes)
        paths = [base] + [beside(base, s, suffixes) for s in suffixes[1:]]
    else:
        try:
            default_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file named like the folder (or like one of its parents)
            raise UserError(f"cannot write outputs to {str(default_dir)!r}: a file is in the way of the folder; "
                            "move it, or give out=FILE") from None
        except OSError as e:
            raise UserError(f"cannot create the output folder {str(default_dir)!r}: {_problem(e)}; give out=FILE") from None
    # after the highest number there (not in a gap: a newer output never gets a lower number)
    taken = [int(m.group(1)) for p in (default_dir.iterdir() if out is None else ())
             if (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.\w+", p.name))]
    i = max(taken, default=0) + 1
    while True:
        if out is None:
            paths = [default_dir / f"{stem}-{i:03d}{s}" for s in suffixes]
        claimed: list[Path] = []
        try:
            for p in paths:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                claimed.append(p)
            return paths
        except FileExistsError as e:
            release_outputs(claimed)
            if out is not None:
                what = "exists already" if e.filename in (None, str(base)) else \
                    f"would write {e.filename!r} beside it, which exists already"
                raise UserError(f"out={out!r} {what}: choose a new name (nothing was overwritten)") from None
            i += 1
        except OSError as e:
            release_outputs(claimed)
            where = f"out={out!r}" if out is not None else f"the output folder {str(default_dir)!r}"
            raise UserError(f"cannot create {str(e.filename or p)!r} ({where}): {_problem(e)}") from None


def release_outputs(paths: list[Path], folders: Sequence[Path] = ()) -> None:
    """Remove claimed output files (the work that was to fill them failed), then those of ``folders``
    (made for them, deepest first) that are left empty; never raises."""
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass
    remove_empty(folders)


def remove_empty(folders: Iterable[Path]) -> None:
    """Remove each folder in turn (a folder, then its parents) while it is empty; stop at the first
    that is not (or cannot go): what else is in it, another run's or the user's, keeps it."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            break


OTHER_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".svg", ".pdf", ".eps"}


def beside(base: Path, suffix: str, suffixes: tuple[str, ...]) -> Path:
    """The output with ``suffix`` that goes beside out=base: base's own suffix replaced where it is an
    output's (a.png: a.gif), else added (lr0.001: lr0.001.gif, not lr0.gif, a name nobody gave)."""
    own = base.suffix.lower() in (*suffixes, ".gif")
    return base.with_suffix(suffix) if own else base.with_name(base.name + suffix)


def _check_out_name(out: str, base: Path, suffixes: tuple[str, ...]) -> None:
    """out= names the first of the outputs (the others go beside it with their own suffixes): not a
    folder, not another output's suffix, and a picture's file ends in .png (it is written as PNG)."""
    suffix = base.suffix.lower()
    if out.endswith(("/", os.sep)) or base.is_dir():
        raise UserError(f"out={out!r} names a folder: give a file name in it, such as "
                        f"{str(base / ('output' + suffixes[0]))!r}")
    if base.name.lower() in suffixes or base.name.lower() in OTHER_IMAGE_SUFFIXES:
        raise UserError(f"out={out!r} is a suffix without a name: give a name such as "
                        f"{str(base.with_name('output' + suffixes[0]))!r}")
    if suffix in suffixes[1:]:
        raise UserError(f"out={out!r}: name the {suffixes[0]} file; the {suffix} is written beside it")
    if suffix in OTHER_IMAGE_SUFFIXES:  # out=figs/lr0.001 stays a name of its own
        beside = f", the plot beside it as {suffixes[1]}" if len(suffixes) > 1 else ""
        written = "the picture is written as PNG" if suffixes[0] == ".png" else \
            f"it is written as {suffixes[0][1:].upper()}{beside}"
        raise UserError(f"out={out!r}: name a {suffixes[0]} file ({written})")


@contextmanager
def claimed_outputs(out: str | None, default_dir: Path, stem: str, suffixes: tuple[str, ...]) -> Iterator[list[Path]]:
    """``claim_outputs``, then run the block; if it raises (an error, Ctrl-C), remove the claimed files.

    An OSError while writing them becomes a one-line UserError naming the file. The default folder
    (RUN/eval/, RUN/samples/), where this made it, goes too when the block leaves it empty.
    """
    made = [] if out is not None else [d for d in (default_dir, *default_dir.parents) if not d.exists()]
    paths = claim_outputs(out, default_dir, stem, suffixes)
    try:
        yield paths
    except OSError as e:
        release_outputs(paths, made)
        if e.filename is not None and str(e.filename) in map(str, paths):
            raise UserError(f"cannot write {str(e.filename)!r}: {_problem(e)}") from None
        raise
    except BaseException:
        release_outputs(paths, made)
        raise
