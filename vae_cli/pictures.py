"""Pictures of a trained model: samples, interpolations, reconstructions, traversals, the 2-d manifold.

Pure functions build image tensors (N, C, H, W) in [0, 1] (the likelihood's mean, clamped); the
commands at the bottom load a run, call them, and write a PNG (and a GIF) that never overwrites
an earlier one. Nothing here imports Lightning, so the commands start fast.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch.distributions import Normal

from vae_cli.errors import UserError
from vae_cli.model import VAE
from vae_cli.runs import FromDataSettings, FromRunSettings
from vae_cli.typed import NonNegInt, PosFloat, PosInt

# ----------------------------------------------------------------------------- settings
# One class per command (conf/<command>.yaml): vae_cli.settings checks a command line against it.

Steps = Annotated[int, Field(ge=2)]
Mode = Literal["mean", "sample"]   # mean: the mean of p(x|z); sample: a draw from it


class SampleSettings(FromRunSettings):
    n: PosInt = 64
    nrow: PosInt = 8
    temperature: PosFloat = 1.0    # scales the prior's standard deviation (prior=standard only)
    mode: Mode = "mean"


class InterpolateSettings(FromDataSettings):
    pairs: PosInt = 4
    steps: Steps = 10
    index: NonNegInt = 0
    source: Literal["data", "prior"] = "data"
    method: Literal["linear", "slerp"] = "linear"
    mode: Mode = "mean"
    gif: bool = False


class ReconstructSettings(FromDataSettings):
    n: PosInt = 16
    index: NonNegInt = 0


class TraverseSettings(FromDataSettings):
    index: NonNegInt = 0           # the one image whose code is varied
    steps: Steps = 9
    range: PosFloat = 3.0          # each dimension sweeps [-range, range]
    dims: PosInt | None = None     # only the first N dimensions by KL


class ManifoldSettings(FromRunSettings):
    steps: Steps = 20

# ----------------------------------------------------------------------------- image helpers


def pixels_of(model: VAE, z: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None) -> torch.Tensor:
    """Decode z (N, D) to images (N, C, H, W) in [0, 1]: the mean of p(x|z), or one draw from it."""
    px = model.decode(z)
    if mode == "sample":
        base = px.base_dist
        if isinstance(base, torch.distributions.Bernoulli):
            x = torch.bernoulli(base.probs, generator=generator)
        else:
            x = base.loc + base.scale * torch.randn(base.loc.shape, generator=generator, device=base.loc.device)
    else:
        x = px.mean
    return x.clamp(0, 1)


def grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    """Tile images (N, C, H, W) into one image (C, H', W'), nrow per row, white padding between.

    (torchvision.utils.make_grid does the same; this avoids importing torchvision, a second.)
    """
    images = images.detach().cpu().float()
    n, c, h, w = images.shape
    cols, rows = min(nrow, n), -(-n // nrow)
    out = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        out[:, top : top + h, left : left + w] = img
    return out


def to_pil(image: torch.Tensor):
    """A (C, H, W) tensor in [0, 1] as a PIL image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(image: torch.Tensor, path: Path) -> Path:
    to_pil(image).save(path, format="PNG")
    return path


# ----------------------------------------------------------------------------- latent paths


def lerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(1 - t) z0 + t z1 for each t: (T, D); exact at t = 0 and t = 1."""
    t = t[:, None]
    return (1 - t) * z0 + t * z1


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (White 2016, "Sampling generative networks"): (T, D).

    Follows the great circle between the directions of z0 and z1, which keeps points at the typical
    radius of a high-dimensional Gaussian; falls back to lerp when z0 and z1 are (anti)parallel.
    """
    cos = torch.dot(z0 / z0.norm(), z1 / z1.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if torch.sin(omega).abs() < 1e-6:
        return lerp(z0, z1, t)
    t = t[:, None]
    return (torch.sin((1 - t) * omega) * z0 + torch.sin(t * omega) * z1) / torch.sin(omega)


def latent_path(z0: torch.Tensor, z1: torch.Tensor, steps: int, method: str = "linear") -> torch.Tensor:
    """steps points from z0 to z1 inclusive: (steps, D)."""
    t = torch.linspace(0, 1, steps, dtype=z0.dtype, device=z0.device)
    return (slerp if method == "slerp" else lerp)(z0, z1, t)


# ----------------------------------------------------------------------------- pictures


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The global RNG seeded for the block and restored after (a Distribution's sample takes no generator)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def prior_draws(model: VAE, n: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """n draws of z ~ p(z), seeded, on the model's device: (n, D).

    With the standard prior, z = temperature * eps (eps ~ N(0, I)); a temperature means nothing
    for another prior (a mixture has no single scale), so anything but 1 is refused there."""
    if model.standard_prior:
        z = temperature * torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))  # (n, D)
        return z.to(model.prior_loc)  # the model's device and dtype (trainer.precision=64-true, ...)
    if temperature != 1.0:
        raise UserError(f"temperature={temperature} is not allowed: it scales N(0, I), and this model's prior is "
                        f"{getattr(model, 'prior_description', None) or type(model.prior_module).__name__}; use temperature=1")
    with _seeded(seed):
        return model.prior.sample((n,))


@torch.no_grad()
def sample_images(model: VAE, n: int, temperature: float = 1.0, mode: str = "mean", seed: int = 0) -> torch.Tensor:
    """n images decoded from z ~ p(z) (for N(0, I): z ~ N(0, temperature^2 I)): (n, C, H, W)."""
    z = prior_draws(model, n, seed, temperature)
    g = torch.Generator(device=model.device).manual_seed(seed + 1)  # for draws from p(x|z), on the model's device
    return pixels_of(model, z, mode, g)


@torch.no_grad()
def interpolation_rows(
    model: VAE, z0: torch.Tensor, z1: torch.Tensor, steps: int, method: str = "linear", mode: str = "mean",
    seed: int = 0,
) -> torch.Tensor:
    """One row of decoded path points per pair: z0, z1 (P, D) -> (P, steps, C, H, W).

    A hierarchy (model=ladder) is walked in its top latent z_L, each layer below following as the
    mean of p(z_l | z_{l+1}): the path stays where the generative model puts its mass."""
    g = torch.Generator(device=z0.device).manual_seed(seed)
    if hasattr(model, "from_top"):
        paths = [model.from_top(latent_path(model.top_latent(a), model.top_latent(b), steps, method))
                 for a, b in zip(z0, z1)]
    else:
        paths = [latent_path(a, b, steps, method) for a, b in zip(z0, z1)]
    rows = [pixels_of(model, path, mode, g) for path in paths]
    return torch.stack(rows)


@torch.no_grad()
def encode_mean(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The code of x, (B, D): the mean of q(z|x) for the Gaussian posterior; for a flow, the flow
    applied to its base Gaussian's mean (``VAE.encode``)."""
    return model.encode(x)


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The mean of p(x|z) at z = the mean of q(z|x): (B, C, H, W)."""
    return pixels_of(model, encode_mean(model, x))


@torch.no_grad()
def kl_per_dimension(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The mean over x of KL(q(z_d|x) || p(z_d)) for each latent dimension d: (D,).

    Defined for the diagonal Gaussian posterior and the standard prior only (see ``activity``)."""
    from vae_cli.objectives import kl_per_dim

    return kl_per_dim(model.posterior(x), model.prior).mean(0)


def per_dimension_kl_exists(model: VAE) -> bool:
    """Whether q(z|x) and p(z) both factorise into Gaussians over dimensions (KL per dimension defined)."""
    from vae_cli.posteriors import GaussianPosterior

    return model.standard_prior and isinstance(model.posterior_module, GaussianPosterior)


@torch.no_grad()
def activity(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """The variance over x of each dimension of the code (Burda et al. 2016's activity of a unit): (D,)."""
    return model.encode(x).var(0)


@torch.no_grad()
def traversal(model: VAE, x: torch.Tensor, dims: list[int], steps: int, span: float) -> torch.Tensor:
    """For one input x (1, C, H, W): rows = dims, columns = z_d swept over [-span, span]; (len(dims)*steps, C, H, W)."""
    mu = encode_mean(model, x)[0]                                   # (D,)
    values = torch.linspace(-span, span, steps, device=mu.device)
    z = mu.repeat(len(dims), steps, 1)                              # (R, S, D)
    for r, d in enumerate(dims):
        z[r, :, d] = values
    return pixels_of(model, z.reshape(-1, mu.numel()))


@torch.no_grad()
def manifold_images(model: VAE, steps: int, seed: int = 0) -> torch.Tensor:
    """Decode a steps x steps grid over the 2-d latent plane through the prior's inverse CDF
    (Kingma and Welling 2014, fig. 4): equal probability mass between neighbours. (steps^2, C, H, W).

    For another prior the two axes are the quantiles of its marginals, read from 5000 seeded
    prior draws: equal marginal mass between neighbours."""
    u = torch.linspace(0.5 / steps, 1 - 0.5 / steps, steps)        # avoid the infinite ends
    if model.standard_prior:
        v1 = v2 = Normal(0.0, 1.0).icdf(u)                          # (S,)
    else:
        draws = prior_draws(model, 5000, seed).cpu()                # (N, 2)
        v1, v2 = torch.quantile(draws, u, dim=0).T                  # (S,) each
    z2, z1 = torch.meshgrid(v2.flip(0), v1, indexing="ij")          # rows: z2 from high to low
    z = torch.stack([z1, z2], dim=-1).reshape(-1, 2)                 # (S*S, 2)
    return pixels_of(model, z.to(model.device))


# ----------------------------------------------------------------------------- commands


def _load(cfg):
    from vae_cli.runs import check_out, load_model, pick_device, run_dir_of

    check_out(cfg.out, gif=bool(cfg.get("gif")))
    model, config, ckpt = load_model(cfg.run, cfg.ckpt, device=str(pick_device(cfg.device)))
    return model, config, ckpt, run_dir_of(ckpt) / "samples"


def check_picture_size(count: int, asked: str, config: dict) -> None:
    """Refuse, before any work, a picture of more images than this machine can make: each image is
    decoded, kept as floats, copied into the grid and turned into bytes (about 16 x 4 bytes a pixel
    at the peak, with the decoder's activations). Past the memory it would fill it for minutes."""
    from vae_cli.errors import available_memory

    need = 16 * 4 * count * math.prod(config["dataset"]["shape"])
    have = available_memory()
    if have and need > have:
        raise UserError(f"{asked} makes a picture of {count} images, about {need / 1e9:.1f} GB while it is made, "
                        f"more than the {have / 1e9:.1f} GB free here: ask for fewer")


GIF_MAX_SIDE = 65535  # a GIF keeps a frame's width and height in two bytes each


def check_gif_width(pairs: int, width: int, pad: int = 2) -> None:
    """Refuse, before any work, GIF frames wider than a GIF can be: write_gif sets the pairs side by
    side, each image ``width`` pixels and ``pad`` apart (grid), which PIL failed on with a traceback."""
    side = pairs * (width + pad) + pad
    if side > GIF_MAX_SIDE:
        most = (GIF_MAX_SIDE - pad) // (width + pad)
        raise UserError(f"pairs={pairs} with gif=true makes GIF frames {side} pixels wide, more than a GIF can hold "
                        f"({GIF_MAX_SIDE}): ask for at most {most} pairs, or gif=false for the PNG alone")


def _inputs(cfg, config: dict, model: VAE, start: int, count: int, asked: str) -> tuple[torch.Tensor, torch.Tensor]:
    """count images of cfg.split from start (asked: the setting that made count, for an error):
    (model input, grey-level display), both (count, C, H, W)."""
    from vae_cli.data import run_split

    trained = getattr(model, "trained_data", None)  # a folder's split digests, from the checkpoint
    return _take(*run_split(config, cfg.split, cfg.data_dir, trained), cfg, model, start, count, asked)


def _take(images: torch.Tensor, pixels: str, cfg, model: VAE, start: int, count: int,
          asked: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images[start:start+count] as (model input in the run's pixel mode, grey-level display)."""
    from vae_cli.data import to_pixels

    if start + count > len(images):
        what = f"{asked} from index={start}" if asked else f"index={start}"
        raise UserError(f"{what} runs past the {cfg.split} split ({len(images)} images): ask for fewer, "
                        "or start earlier")
    raw = images[start : start + count].to(model.device)
    g = torch.Generator(device=raw.device).manual_seed(cfg.seed)
    return to_pixels(raw, pixels, g), raw.float() / 255


@contextmanager
def _outputs(cfg, default_dir: Path, stem: str, gif: bool = False) -> Iterator[list[Path]]:
    """Claim the output names first (a bad out= fails before any work), then yield them to the work;
    if it fails or is interrupted the claimed files are removed. Prints the paths when done."""
    from vae_cli.runs import claimed_outputs

    with claimed_outputs(cfg.out, default_dir, stem, (".png", ".gif") if gif else (".png",)) as paths:
        yield paths
    print("\n".join(map(str, paths)))


def _save(paths: list[Path], image: torch.Tensor, gif: torch.Tensor | None = None) -> Path:
    """Write the PNG (and the GIF of ``gif`` rows) into the claimed files."""
    try:
        save_png(image, paths[0])
        if gif is not None:
            write_gif(gif, paths[1])
    except OSError as e:
        raise UserError(f"cannot write {str(e.filename or paths[0])!r}: {e.strerror or e}") from None
    return paths[0]


def sample(cfg) -> Path:
    """`vae sample`: a grid of n images decoded from the prior."""
    model, config, _, out_dir = _load(cfg)
    check_picture_size(cfg.n, f"n={cfg.n}", config)
    with _outputs(cfg, out_dir, "sample") as paths:
        images = sample_images(model, cfg.n, cfg.temperature, cfg.mode, cfg.seed)
        return _save(paths, grid(images, cfg.nrow))


def interpolate(cfg) -> Path:
    """`vae interpolate`: rows of decoded points between two latent codes, real inputs at the ends."""
    model, config, _, out_dir = _load(cfg)
    check_picture_size(cfg.pairs * (cfg.steps + 2) * (2 if cfg.gif else 1), f"pairs={cfg.pairs} steps={cfg.steps}",
                       config)
    if cfg.gif:
        check_gif_width(cfg.pairs, config["dataset"]["shape"][-1])
    with _outputs(cfg, out_dir, "interpolate", gif=bool(cfg.gif)) as paths:
        if cfg.source == "prior":
            z, ends = prior_draws(model, 2 * cfg.pairs, cfg.seed), None
        else:
            x, shown = _inputs(cfg, config, model, cfg.index, 2 * cfg.pairs, f"pairs={cfg.pairs} (2 images each)")
            z, ends = encode_mean(model, x), shown
        rows = interpolation_rows(model, z[0::2], z[1::2], cfg.steps, cfg.method, cfg.mode, cfg.seed)  # (P, S, C, H, W)
        if ends is not None:
            rows = torch.cat([ends[0::2, None], rows, ends[1::2, None]], dim=1)              # (P, S+2, C, H, W)
        walk = (rows[:, 1:-1] if ends is not None else rows) if cfg.gif else None
        return _save(paths, grid(rows.flatten(0, 1), rows.shape[1]), gif=walk)


def write_gif(rows: torch.Tensor, path: Path, ms: int = 80) -> None:
    """Animate the path: frame t shows point t of every pair, side by side; it walks there and back."""
    frames = [to_pil(grid(rows[:, t], rows.shape[0])) for t in range(rows.shape[1])]
    frames = frames + frames[-2:0:-1]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=ms, loop=0)


def reconstruct(cfg) -> Path:
    """`vae reconstruct`: rows of test inputs, each above its reconstructions."""
    model, config, _, out_dir = _load(cfg)
    with _outputs(cfg, out_dir, "reconstruct") as paths:
        x, shown = _inputs(cfg, config, model, cfg.index, cfg.n, f"n={cfg.n}")
        recon = reconstructions(model, x)
        per_row = min(cfg.n, 8)
        blocks = [torch.cat([shown[i : i + per_row], recon[i : i + per_row]]) for i in range(0, cfg.n, per_row)]
        if cfg.n % per_row:  # pad the last block so the input and reconstruction rows stay aligned
            last = cfg.n % per_row
            pad = shown.new_ones(per_row - last, *shown.shape[1:])  # white, where the pictures are (a GPU)
            blocks[-1] = torch.cat([shown[-last:], pad, recon[-last:], pad])
        return _save(paths, grid(torch.cat(blocks), per_row))


def traverse(cfg) -> Path:
    """`vae traverse`: one row per latent dimension (most KL first), each swept over [-range, range]."""
    from vae_cli.data import run_split

    model, config, _, out_dir = _load(cfg)
    _refuse_hierarchy(model, "traverse")
    # The sizes first, before the data is read and the output claimed: one row per dimension,
    # steps images a row (steps=1000000 on a 20-d model filled 23 GB until the kernel killed it).
    if cfg.dims and cfg.dims > model.latent_dim:
        raise UserError(f"dims={cfg.dims} is more than this model has: give at most its {model.latent_dim} "
                        "latent dimensions")
    rows = cfg.dims or model.latent_dim
    asked = f"steps={cfg.steps}" + (f" dims={cfg.dims}" if cfg.dims else f" ({rows} rows, one per latent dimension)")
    check_picture_size(rows * cfg.steps, asked, config)
    images, pixels = run_split(config, cfg.split, cfg.data_dir, getattr(model, "trained_data", None))  # read once
    x, _ = _take(images, pixels, cfg, model, cfg.index, 1)          # an index past the split: refused now
    pool, _ = _take(images, pixels, cfg, model, 0, min(1000, len(images)))
    with _outputs(cfg, out_dir, "traverse") as paths:
        if per_dimension_kl_exists(model):
            score, label = kl_per_dimension(model, pool), "KL (nats)"
        else:  # a flow or the VampPrior: no KL per dimension; rank by how much the code varies
            score, label = activity(model, pool), "activity (variance of the code over inputs)"
        order = score.argsort(descending=True).tolist()
        dims = order[: cfg.dims] if cfg.dims else order
        print(f"rows, by {label}: " + ", ".join(f"z{d} {score[d]:.2f}" for d in dims), file=sys.stderr)
        return _save(paths, grid(traversal(model, x, dims, cfg.steps, cfg.range), cfg.steps))


def _refuse_hierarchy(model: VAE, command: str) -> None:
    """A hierarchical model (model=ladder) decodes from z_1 alone: sweeping single coordinates of the
    concatenated z, or a 2-d plane of it, would show rows that do not change. One line, no picture."""
    dims = getattr(model, "latent_dims", None)
    if dims is not None and len(dims) > 1:
        raise UserError(f"vae {command} is not available for a model with {len(dims)} stochastic layers "
                        f"(latent_dims={list(dims)}): it needs a single latent layer (model=mlp, conv or resnet)")


def manifold(cfg) -> Path:
    """`vae manifold`: the decoded 2-d latent plane."""
    model, config, _, out_dir = _load(cfg)
    _refuse_hierarchy(model, "manifold")
    check_picture_size(cfg.steps**2, f"steps={cfg.steps} (a steps x steps grid)", config)
    if model.latent_dim != 2:
        raise UserError(f"vae manifold needs a 2-d latent space; this model has latent_dim={model.latent_dim} "
                        "(train one with model.latent_dim=2)")
    with _outputs(cfg, out_dir, "manifold") as paths:
        return _save(paths, grid(manifold_images(model, cfg.steps, cfg.seed), cfg.steps))
