"""How far an importance-sampling estimate of log p(x) can be trusted, from its log weights alone.

Both diagnostics read a tensor of log importance weights log w_i = log p(x, z_i) - log r(z_i),
z_i ~ r, shaped (k, B): k draws for each of B examples.

- Effective sample size (Kong 1992): ESS = (sum w)^2 / sum w^2, between 1 (one draw carries all
  the weight) and k (all weights equal). A small ESS means the estimate rests on a few draws.
- Pareto k-hat (Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto smoothed importance sampling",
  JMLR 2024): the shape of a generalized Pareto distribution fitted to the largest weights.
  k-hat < 0.5: the weights have a finite variance; 0.5-0.7: the estimate is still usable;
  k-hat > 0.7: the weights are so heavy-tailed that the estimate cannot be trusted, however large
  k is (the proposal misses part of the posterior). The fit is arviz-stats' implementation.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KHAT_BAD = 0.7  # Vehtari et al. 2024, section 3: above it, the IS estimate is unreliable


def ess(log_w: torch.Tensor) -> torch.Tensor:
    """Effective sample size of each example's weights: (k, B) -> (B,), in [1, k]."""
    log_w = log_w.double()
    return (2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp()


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k-hat of each example's weights: (k, B) -> (B,); NaN where k < 5 draws, or where
    arviz-stats cannot fit the tail (too few draws in it).

    The tail is the largest min(k/5, 3 sqrt(k)) weights, as in PSIS (r_eff = 1: the draws are
    independent). Weights that are all equal have no tail: k-hat is -inf there (perfect).
    """
    from arviz_stats.base import array_stats

    k = log_w.shape[0]
    if k < 5:
        return torch.full(log_w.shape[1:], math.nan, dtype=torch.float64)
    lw = log_w.detach().double().cpu().numpy().T                      # (B, k)
    out = np.full(lw.shape[0], -np.inf)
    flat = np.ptp(np.where(np.isfinite(lw), lw, 0.0), axis=1) < 1e-12  # all weights equal: nothing to fit
    for i in np.flatnonzero(~flat):
        row = lw[i]
        row = np.where(np.isfinite(row), row, row[np.isfinite(row)].min() - 1e3 if np.isfinite(row).any() else 0.0)
        # psislw takes log-likelihood values and smooths the weights 1/p (PSIS-LOO): hence the minus
        try:
            _, out[i] = array_stats.psislw(-row)
        except ValueError:  # arviz-stats 0.x refuses a tail of under 5 draws (k < 25) or a flat one
            out[i] = math.nan
    return torch.from_numpy(out)


def summarize(log_w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example {"ess", "khat"} of log weights (k, B)."""
    return {"ess": ess(log_w).cpu(), "khat": pareto_khat(log_w)}
