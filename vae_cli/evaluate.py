"""`vae evaluate`: the test log-likelihood log p(x), the ELBO and the gap, side by side."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

from vae_cli.data import Batches
from vae_cli.estimators import bits_per_dim, estimate, mean_and_stderr
from vae_cli.model import VAE
from vae_cli.runs import FromRunSettings
from vae_cli.typed import PosInt


class EvaluateSettings(FromRunSettings):
    """The settings of `vae evaluate` (conf/evaluate.yaml), beside those every command reading a run
    shares. A new setting: a typed field here (constraints in Annotated[..., Field(...)]) and its key
    in conf/evaluate.yaml; vae_cli.settings derives its check."""

    k: PosInt = 5000                # importance samples
    limit: PosInt | None = None     # only the first N examples
    batch_size: PosInt = 100        # examples per batch
    chunk: PosInt = 8192            # (example, sample) pairs decoded at once

FIGURES = ("elbo", "log_px", "gap", "recon", "kl")
GAP_NOTE = "gap = log p(x) - ELBO: the estimated KL(q(z|x) || p(z|x)), how far q is from the true posterior"


def evaluate_split(
    model: VAE,
    images: torch.Tensor,
    pixels: str,
    k: int,
    batch_size: int = 100,
    rows: int = 8192,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate uint8 images (N, C, H, W): means and standard errors of every figure, in nats.

    ``pixels`` is the mode the model was trained with (see vae_cli.data); dynamic binarization
    and dequantization use one fixed draw seeded by ``seed``, so figures compare across runs.
    """
    device = next(model.parameters()).device
    torch.manual_seed(seed + 1)  # the draws z ~ q(z|x); the pixel noise below has its own stream (seed)
    batches = Batches(images.to(device), batch_size, pixels, shuffle=False, seed=seed, fixed_noise=True)
    parts: dict[str, list[torch.Tensor]] = {f: [] for f in FIGURES}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(images), unit="ex", desc=f"k={k}", file=sys.stderr, dynamic_ncols=True)
    for x in batches:
        for name, v in estimate(model, x, k, rows).items():
            parts[name].append(v.cpu())
        if bar is not None:
            bar.update(len(x))
    if bar is not None:
        bar.close()
    dims = math.prod(images.shape[1:])
    out: dict[str, Any] = {"n": len(images), "k": k, "dims": dims, "pixels": pixels}
    for name in FIGURES:
        out[name], out[f"{name}_se"] = mean_and_stderr(torch.cat(parts[name]))
    out["bits_per_dim"] = {f: bits_per_dim(out[f], dims, pixels) for f in ("elbo", "log_px")}
    return out


def table(r: dict[str, Any]) -> str:
    """The terminal table: nats per example with standard errors, bits/dim beside."""
    rows = [("ELBO", "elbo"), ("log p(x)  (IWAE)", "log_px"), ("gap", "gap"), ("  recon  E_q log p(x|z)", "recon"),
            ("  KL(q(z|x) || p(z))", "kl")]
    lines = [f"{'':26}{'nats/example':>14}{'± s.e.':>10}{'bits/dim':>10}"]
    for label, key in rows:
        bpd = r["bits_per_dim"].get(key)
        lines.append(f"{label:26}{r[key]:14.3f}{r[key + '_se']:10.3f}{(f'{bpd:.4f}' if bpd is not None else ''):>10}")
    lines.append(GAP_NOTE)
    if r["pixels"] == "none":
        lines.append("bits/dim: none, a Bernoulli on grey levels is not a probability of the data")
    elif r["pixels"] == "dequantize":
        lines.append("bits/dim: 8-bit images, dequantized x = (b + u)/256: -(log p(x) - D ln 256) / (D ln 2)")
    else:
        lines.append(f"bits/dim: per binarized pixel ({r['pixels']} binarization), -log p(x) / (D ln 2)")
    return "\n".join(lines)


def evaluate(cfg) -> dict[str, Any]:
    """The `vae evaluate` command: load the model, estimate, print the table, write the JSON."""
    from vae_cli.runs import check_out, claim_outputs, load_model, pick_device, run_dir_of
    from vae_cli.data import run_split

    device = pick_device(cfg.device)
    model, config, ckpt = load_model(cfg.run, cfg.ckpt, device=str(device))
    check_out(cfg.out)
    images, pixels = run_split(config, cfg.split, cfg.data_dir)
    if cfg.limit is not None:
        images = images[: cfg.limit]
    print(f"vae evaluate: {cfg.split} split, {len(images)} examples, k={cfg.k}, checkpoint {ckpt}", file=sys.stderr)
    r = evaluate_split(model, images, pixels, cfg.k, cfg.batch_size, cfg.chunk, cfg.seed, progress=True)
    r.update(split=cfg.split, checkpoint=str(ckpt), seed=cfg.seed, likelihood=config["likelihood"]["_target_"])
    print(table(r))
    (out,) = claim_outputs(cfg.out, run_dir_of(ckpt) / "eval", f"{cfg.split}-k{cfg.k}", (".json",))
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"wrote {out}")
    return r
