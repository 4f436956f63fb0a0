"""Runs and checkpoints: find the run, load its checkpoint safely, rebuild the model, name outputs.

A checkpoint is untrusted input: it is read with ``torch.load(weights_only=True)``, which unpickles
tensors and plain containers only and runs no code from the file. The model is rebuilt from the
resolved config stored in the checkpoint itself (``checkpoint["vae_cli"]["config"]``), so a
checkpoint copied anywhere still loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vae_cli.errors import UserError

OUTPUTS = Path("outputs")


def last_checkpoint(run_dir: str | Path) -> Path:
    """run_dir/checkpoints/last.ckpt, or a UserError saying what is missing."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise UserError(f"run={str(run_dir)!r} is not a folder: give a run folder under outputs/")
    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"run={str(run_dir)!r} has no checkpoints/last.ckpt: is it a `vae train` run folder?")
    return ckpt


def newest_run(root: str | Path = OUTPUTS) -> Path:
    """The run under root (searched recursively, sweeps included) whose last.ckpt was written last."""
    ckpts = list(Path(root).glob("**/checkpoints/last.ckpt"))
    if not ckpts:
        raise UserError(f"no trained run under {str(root)!r}: train one with `vae train`, or give run=DIR or ckpt=FILE")
    return max(ckpts, key=lambda p: p.stat().st_mtime_ns).parent.parent


def find_checkpoint(run: str | None, ckpt: str | None) -> Path:
    """ckpt=FILE, else run=DIR's last checkpoint, else the newest run's."""
    if ckpt is not None:
        path = Path(ckpt).expanduser()
        if not path.is_file():
            raise UserError(f"ckpt={ckpt!r} does not exist: give a .ckpt file written by `vae train`")
        return path
    return last_checkpoint(run) if run is not None else last_checkpoint(newest_run())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a vae-cli checkpoint without running code from it; UserError if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError for non-zip files, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"ckpt={str(path)!r} is not a vae-cli checkpoint (refused to load it: {reason[:160]})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("vae_cli"), dict) and "state_dict" in ckpt):
        raise UserError(f"ckpt={str(path)!r} is not a vae-cli checkpoint (it holds no vae-cli config)")
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
        raise UserError(f"ckpt={str(path)!r} could not be rebuilt into a model ({str(e).splitlines()[0][:160]})") from None
    return model.to(device), config, path


def run_dir_of(ckpt_path: Path) -> Path:
    """The run folder of a checkpoint: the parent of checkpoints/, else the checkpoint's own folder."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def output_path(out: str | None, default_dir: Path, stem: str, suffix: str) -> Path:
    """Where to write: out=FILE (refused if it exists), else default_dir/stem-NNN.suffix, the next free number.

    Nothing written before is ever overwritten.
    """
    if out is not None:
        path = Path(out).expanduser()
        if path.exists():
            raise UserError(f"out={out!r} exists already: choose a new file name (nothing was overwritten)")
        if not path.parent.exists():
            raise UserError(f"out={out!r}: the folder {str(path.parent)!r} does not exist")
        return path
    default_dir.mkdir(parents=True, exist_ok=True)
    i = 1
    while (default_dir / f"{stem}-{i:03d}{suffix}").exists():
        i += 1
    return default_dir / f"{stem}-{i:03d}{suffix}"


def claim(path: Path) -> Path:
    """Create path exclusively (fails if another process took the name meanwhile)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.close(fd)
    return path
