"""Per-example estimates of the ELBO and of log p(x), on plain tensors (no Lightning).

    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))   so   ELBO(x) <= log p(x)

The importance-weighted bound (Burda, Grosse and Salakhutdinov 2016, eq. 8)

    L_k(x) = log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x)

is a lower bound on log p(x) for every k, rises with k, and tends to log p(x) as k -> infinity;
L_1 is a one-sample ELBO. Papers report log p(x) ~ L_5000. The k samples are drawn in chunks and
combined by a running log-sum-exp in float64, so memory is bounded by ``rows`` whatever k is.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import kl_divergence

from vae_cli.model import VAE


@torch.no_grad()
def elbo(model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One-sample ELBO per example: {"elbo", "recon", "kl"}, each (B,), kl in closed form."""
    recon, kl = model.elbo_terms(x)
    return {"elbo": recon - kl, "recon": recon, "kl": kl}


@torch.no_grad()
def estimate(model: VAE, x: torch.Tensor, k: int, rows: int = 8192) -> dict[str, torch.Tensor]:
    """ELBO terms and the IWAE log p(x) per example, all from the same k draws of q(z|x).

    Returns float64 tensors of shape (B,): ``log_px`` (L_k), ``recon`` (the mean of log p(x|z_i)
    over the k draws), ``kl`` (closed form), ``elbo`` = recon - kl and ``gap`` = log_px - elbo.
    ``rows`` bounds how many (sample, example) pairs are decoded at once.
    """
    q = model.posterior(x)                                     # batch (B,), event (D,)
    kl = kl_divergence(q, model.prior).double()                # (B,)
    per_chunk = max(1, rows // len(x))
    log_sum_w = torch.full((len(x),), -math.inf, dtype=torch.float64, device=x.device)
    sum_log_px_z = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    done = 0
    while done < k:
        c = min(per_chunk, k - done)
        z = q.sample((c,))                                     # (c, B, D)
        log_px_z = model.decode(z).log_prob(x)                 # (c, B)
        log_w = log_px_z + model.prior.log_prob(z) - q.log_prob(z)  # (c, B) log importance weights
        log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w.double(), dim=0))
        sum_log_px_z += log_px_z.double().sum(0)
        done += c
    log_px = log_sum_w - math.log(k)
    recon = sum_log_px_z / k
    out = {"log_px": log_px, "recon": recon, "kl": kl, "elbo": recon - kl}
    out["gap"] = out["log_px"] - out["elbo"]
    return out


def iwae(model: VAE, x: torch.Tensor, k: int, rows: int = 8192) -> torch.Tensor:
    """The IWAE estimate of log p(x) with k samples, per example: (B,) float64."""
    return estimate(model, x, k, rows)["log_px"]


def bits_per_dim(log_px: float, dims: int, pixels: str) -> float | None:
    """Bits per dimension of a log-likelihood in nats, or None where it means no probability.

    - binarized pixels (``dynamic``/``static``): -log p(x) / (D ln 2), bits per binary pixel;
    - ``dequantize`` (x = (b + u)/256, a density on [0,1]^D): the 8-bit probability is
      p(x) / 256^D, so bits/dim = -(log p(x) - D ln 256) / (D ln 2) (Theis et al. 2016);
    - ``none`` (Bernoulli on grey levels): not a normalised likelihood of the data, so None.
    """
    if pixels in ("dynamic", "static"):
        return -log_px / (dims * math.log(2))
    if pixels == "dequantize":
        return -(log_px - dims * math.log(256)) / (dims * math.log(2))
    return None


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """The mean over examples and its standard error (sample std / sqrt(n); 0 for n = 1)."""
    v = values.double()
    n = len(v)
    se = (v.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else 0.0
    return v.mean().item(), se
