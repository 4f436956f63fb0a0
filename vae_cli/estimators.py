"""Per-example estimates of the ELBO and of log p(x), on plain tensors (no Lightning).

    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))   so   ELBO(x) <= log p(x)

Every sampling estimator here sees a model through two things only (vae_cli.model.VAE):
``proposal(x)``, a distribution over z, and ``log_joint(x, z)`` = log p(x|z) + log p(z). Their
common currency is a tensor of log importance weights, shaped (k, B).

- IWAE (Burda, Grosse and Salakhutdinov 2016, eq. 8): L_k(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x),
  z_i ~ q(z|x). A lower bound on log p(x) for every k (in expectation), rising with k towards it;
  L_1 is a one-sample ELBO. Papers report L_5000.
- Refined proposal (Cremer, Li and Duvenaud 2018, "Inference suboptimality in VAEs"): for each x,
  optimise a Gaussian q*(z) = N(mu, diag sigma^2), started at the encoder's q(z|x), to maximise
  the ELBO, then importance-sample with q*. ELBO(q*) - ELBO(q) is the amortization gap,
  log p(x) - ELBO(q*) the approximation gap.

Samples are drawn in chunks and combined in float64, so memory is bounded by ``rows`` whatever k is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.distributions import Categorical, Distribution, Independent, MixtureSameFamily, Normal

from vae_cli.model import VAE, closed_form_kl

LogJoint = Callable[[torch.Tensor], torch.Tensor]  # z (..., B, D) -> log p(x, z) (..., B)


@torch.no_grad()
def elbo(model: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One-sample ELBO per example: {"elbo", "recon", "kl"}, each (B,), kl in closed form where torch has one."""
    recon, kl = model.elbo_terms(x)
    return {"elbo": recon - kl, "recon": recon, "kl": kl}


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/k) sum_i exp(log_w_i) along dim, in float64."""
    log_w = log_w.double()
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


@torch.no_grad()
def log_weights(log_joint: LogJoint, proposal: Distribution, k: int, rows: int = 8192) -> torch.Tensor:
    """log p(x, z_i) - log r(z_i) for k draws z_i ~ r of each example: (k, B) float64.

    ``rows`` bounds how many (sample, example) pairs are evaluated at once.
    """
    batch = proposal.batch_shape[0]
    per_chunk, parts = max(1, rows // batch), []
    for start in range(0, k, per_chunk):
        z = proposal.sample((min(per_chunk, k - start),))               # (c, B, D)
        parts.append((log_joint(z) - proposal.log_prob(z)).double())   # (c, B)
    return torch.cat(parts)


@torch.no_grad()
def estimate(model: VAE, x: torch.Tensor, k: int, rows: int = 8192) -> dict[str, torch.Tensor]:
    """ELBO terms and the IWAE log p(x) per example, all from the same k draws of q(z|x).

    Returns float64 tensors of shape (B,): ``log_px`` (L_k), ``recon`` (the mean of log p(x|z_i)
    over the k draws), ``kl`` (closed form), ``elbo`` = recon - kl, ``gap`` = log_px - elbo, and
    ``log_w``, the (k, B) log weights (for the diagnostics and the curve over k). Where torch has
    no closed-form KL (a flow posterior, the VampPrior), ``kl`` is the mean of log q - log p over
    the same k draws.
    """
    q = model.proposal(x)                                       # batch (B,), event (D,)
    kl = closed_form_kl(q, model.prior)                         # (B,), or None: no closed form
    kl = kl.double() if kl is not None else None
    recon = torch.zeros(len(x), dtype=torch.float64, device=x.device)

    def log_joint(z: torch.Tensor) -> torch.Tensor:             # (c, B, D) -> (c, B), noting log p(x|z)
        nonlocal recon
        log_px_z = model.decode(z).log_prob(x)                  # (c, B)
        recon = recon + log_px_z.double().sum(0)
        return log_px_z + model.prior.log_prob(z)

    log_w = log_weights(log_joint, q, k, rows)                  # (k, B)
    if kl is None:  # log q - log p = log p(x|z) - log w: its mean over the same k draws
        kl = (recon - log_w.sum(0)) / k
    out = {"log_px": log_mean_exp(log_w), "recon": recon / k, "kl": kl}
    out["elbo"] = out["recon"] - kl
    out["gap"] = out["log_px"] - out["elbo"]
    out["log_w"] = log_w
    return out


def iwae(model: VAE, x: torch.Tensor, k: int, rows: int = 8192) -> torch.Tensor:
    """The IWAE estimate of log p(x) with k samples, per example: (B,) float64."""
    return estimate(model, x, k, rows)["log_px"]


def curve_ks(k: int) -> list[int]:
    """1, 10, 100, ... below k, then k: where the curve of log p(x) over k is read."""
    ks = [10**i for i in range(int(math.log10(k)) + 1) if 10**i < k]
    return ks + [k]


def log_px_curve(log_w: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """L_j from the first j draws, for each j in ks: (len(ks), B). The draws are shared, so the
    curve shows how the one estimate converges (it should flatten)."""
    return torch.stack([log_mean_exp(log_w[:j]) for j in ks])


# --------------------------------------------------------------------------- refined proposal


def _gaussian_start(q: Distribution, draws: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, standard deviation) of a proposal, each (B, D): its own, or moments of draws."""
    try:
        return q.mean.detach(), q.stddev.detach()
    except NotImplementedError:  # a flow or a hierarchy: match the moments of samples
        z = q.sample((draws,))                                  # (S, B, D)
        return z.mean(0), z.std(0).clamp_min(1e-3)


def _prior_starts(log_joint: LogJoint, prior: Distribution, start: torch.Tensor, restarts: int, search: int,
                  radius: float = 0.25) -> torch.Tensor:
    """Up to `restarts` good and distinct prior draws by log p(x, z), per example: (restarts, B, D).

    Why: the encoder can miss a posterior mode entirely (sharp, multimodal posteriors of a 2-d
    latent space sit up to tens of nats above anything q(z|x) proposes). A dense enough set of
    prior draws lands near every mode that carries mass, and a start there lets the optimiser find
    it. Draws are taken best first, skipping any within ``radius`` (prior standard deviations) of
    the encoder's mean ``start`` (B, D) or of a draw already taken, so the starts find other modes.
    """
    z = prior.sample((search, start.shape[0]))                  # (S, B, D)
    with torch.no_grad():
        score = log_joint(z).double()                           # (S, B)
    near = (z - start).norm(dim=-1) < radius                     # (S, B) draws near a start taken
    taken, batch = [], torch.arange(z.shape[1], device=z.device)
    for _ in range(restarts):  # one distance a start (the mask grows), not one for every start taken each time
        best = score.masked_fill(near, -math.inf).argmax(0)     # (B,) the best draw far from the others
        taken.append(z[best, batch])                            # (B, D)
        near |= (z - taken[-1]).norm(dim=-1) < radius
    return torch.stack(taken)


def refine(
    log_joint: LogJoint, q: Distribution, prior: Distribution, *, steps: int = 200, lr: float = 0.05,
    samples: int = 16, restarts: int = 0, search: int = 1024, elbo_samples: int = 256, stats: dict | None = None,
) -> tuple[Distribution, torch.Tensor]:
    """Per-example optimised Gaussian proposals (Cremer et al. 2018), batched over examples.

    Each example gets 1 + ``restarts`` Gaussians: one started at the encoder's q(z|x), the others at
    the best prior draws. Each is optimised for ``steps`` Adam steps on its own reparameterised
    ELBO (``samples`` draws a step). Returns the proposal q*, a mixture of the optimised Gaussians
    weighted by exp(ELBO) (a mixture is a valid proposal whatever its weights), and ELBO(q*): the
    best component's ELBO per example, (B,) float64, estimated with ``elbo_samples`` fresh draws.

    A Gaussian whose optimisation leaves the finite numbers (too large an ``lr``: lr=100 turned
    loc into NaN, and the traceback ended `vae evaluate`) is put back at once, and in the end, to
    the best proper Gaussian it passed through by the ELBO it optimises (at worst its start), so
    q* stays a proper proposal (finite loc, scale finite and above 0) and IS with it stays valid.
    ``stats``, if given, receives "diverged" (B,) bool: the examples where any Gaussian fell back.
    """
    mu, sigma = _gaussian_start(q)                              # (B, D) each
    mu, log_sigma = mu[None], sigma.log()[None]                  # (1, B, D)
    if restarts > 0:
        extra = _prior_starts(log_joint, prior, mu[0], restarts, search)  # (R, B, D)
        mu = torch.cat([mu, extra])
        log_sigma = torch.cat([log_sigma, log_sigma.expand(restarts, -1, -1)])
    mu, log_sigma = mu.clone().requires_grad_(), log_sigma.clone().requires_grad_()
    opt = torch.optim.Adam([mu, log_sigma], lr=lr)
    # The learning rate decays linearly to lr/20: the noisy gradients then settle on the optimum
    # instead of jittering around it (which would leave ELBO(q*) visibly short of its best).
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - 0.95 * t / max(1, steps))
    # The best finite Gaussian seen, per (component, example), by the ELBO estimate of its step.
    kept_elbo = torch.full(mu.shape[:2], -math.inf, dtype=torch.float64, device=mu.device)   # (C, B)
    kept_mu, kept_log_sigma = mu.detach().clone(), log_sigma.detach().clone()
    lost = torch.zeros(mu.shape[:2], dtype=torch.bool, device=mu.device)   # (C, B) went non-finite at some step
    with torch.enable_grad():
        for _ in range(steps):
            elbo = _component_elbo(log_joint, mu, log_sigma, samples)   # (C, B)
            with torch.no_grad():
                e = elbo.detach().double()
                better = torch.isfinite(e) & (e > kept_elbo) & _proper(mu, log_sigma)
                kept_elbo = torch.where(better, e, kept_elbo)
                kept_mu = torch.where(better[..., None], mu.detach(), kept_mu)
                kept_log_sigma = torch.where(better[..., None], log_sigma.detach(), kept_log_sigma)
            opt.zero_grad(set_to_none=True)
            (-elbo.sum()).backward()  # the examples and components are independent problems
            opt.step()
            decay.step()
            with torch.no_grad():  # a Gaussian that left the finite numbers goes back to its best, Adam's state cleared
                now = ~_proper(mu, log_sigma)
                if now.any():
                    lost |= now
                    mu[now], log_sigma[now] = kept_mu[now], kept_log_sigma[now]
                    for p in (mu, log_sigma):
                        for v in opt.state[p].values():
                            if v.shape == p.shape:
                                v[now] = 0
    with torch.no_grad():
        # One that diverged ends at its best, not where the too-large steps left it after a reset.
        mu = torch.where(lost[..., None], kept_mu, mu.detach())
        log_sigma = torch.where(lost[..., None], kept_log_sigma, log_sigma.detach())
        elbos = _each_component_elbo(log_joint, mu, log_sigma, elbo_samples)      # (C, B)
        off = ~torch.isfinite(elbos) & ~lost  # finite, but so far off that log p(x, z) is not finite there
        if off.any():
            lost |= off
            mu = torch.where(off[..., None], kept_mu, mu)
            log_sigma = torch.where(off[..., None], kept_log_sigma, log_sigma)
            elbos = torch.where(off, _each_component_elbo(log_joint, mu, log_sigma, elbo_samples), elbos)
        elbos = elbos.nan_to_num(nan=-math.inf)  # a NaN ELBO ranks last (all of them: equal weights, below)
        if stats is not None:
            stats["diverged"] = lost.any(0)                                        # (B,)
        # The best component's ELBO, estimated again with fresh draws: the maximum of noisy
        # estimates would be biased upwards, and could even exceed log p(x).
        best = elbos.argmax(0)                                                     # (B,)
        pick = best[None, :, None].expand(1, -1, mu.shape[-1])
        elbo_star = _each_component_elbo(log_joint, mu.gather(0, pick), log_sigma.gather(0, pick), elbo_samples)[0]
    components = Independent(Normal(mu.transpose(0, 1), log_sigma.exp().transpose(0, 1)), 1)  # batch (B, C)
    logits = elbos.T.float()                                                       # (B, C)
    logits = torch.where(torch.isneginf(logits).all(-1, keepdim=True), torch.zeros_like(logits), logits)
    mixture = MixtureSameFamily(Categorical(logits=logits), components)
    return mixture, elbo_star


def _proper(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Which Gaussians N(mu, diag exp(log_sigma)^2) are proper, (C, B, D) -> (C, B): finite loc, and
    a scale that is finite and above 0 in every dimension."""
    scale = log_sigma.exp()
    return (torch.isfinite(mu) & torch.isfinite(scale) & (scale > 0)).all(-1)


def _each_component_elbo(log_joint: LogJoint, mu: torch.Tensor, log_sigma: torch.Tensor, samples: int) -> torch.Tensor:
    """ELBO of each Gaussian N(mu, diag exp(log_sigma)^2), (C, B, D) -> (C, B) float64, to report.

    The mean of the log weights log p(x, z) - log q(z): near the optimum they are almost constant
    (equal to log p(x) where q is the posterior), so this has far less variance than the closed-form
    entropy plus a Monte Carlo E_q log p(x, z). One component at a time: ``samples`` x B decodes."""
    out = []
    for c in range(len(mu)):
        q = Independent(Normal(mu[c], log_sigma[c].exp()), 1)                   # batch (B,)
        z = q.sample((samples,))                                                 # (S, B, D)
        out.append((log_joint(z) - q.log_prob(z)).double().mean(0))
    return torch.stack(out)


def _component_elbo(log_joint: LogJoint, mu: torch.Tensor, log_sigma: torch.Tensor, samples: int) -> torch.Tensor:
    """Reparameterised ELBO of Gaussians N(mu, diag exp(log_sigma)^2), (C, B, D) -> (C, B).

    E_q[log p(x, z)] by Monte Carlo; the entropy of q in closed form."""
    eps = torch.randn(samples, *mu.shape, device=mu.device, dtype=mu.dtype)   # (S, C, B, D)
    z = mu + log_sigma.exp() * eps
    entropy = log_sigma.sum(-1) + 0.5 * mu.shape[-1] * (1 + math.log(2 * math.pi))  # (C, B)
    return log_joint(z).mean(0) + entropy


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
