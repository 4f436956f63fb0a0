"""Annealed importance sampling (AIS) with HMC transitions, and bidirectional Monte Carlo (BDMC).

AIS (Neal 2001) moves samples of an initial density f_0 = q(z) (normalised) to the target
f_T(z) = p(x, z) (normaliser p(x)) through the geometric path

    f_t(z) = q(z)^(1 - beta_t) p(x, z)^beta_t,    0 = beta_0 < beta_1 < ... < beta_T = 1,

on the sigmoid schedule of Grosse, Ghahramani and Adams (2015) and Wu, Burda, Salakhutdinov and
Grosse (2017, "On the quantitative analysis of decoder-based generative models"). A chain draws
z_0 ~ q, and for t = 1..T adds log f_t(z_{t-1}) - log f_{t-1}(z_{t-1}) to its log weight, then
moves z by one HMC transition that leaves f_t invariant. Then E[w] = p(x), so log_mean_exp of the
log weights over chains is a stochastic lower bound on log p(x) (by Jensen, E[log w_bar] <= log p(x)).

Reverse AIS runs the same chain backwards from an exact posterior sample; BDMC (Grosse et al. 2015)
pairs the two on simulated data, where exact posterior samples are free, to sandwich log p(x).

Everything is batched: z is (S, B, D), S chains for each of B examples; log weights are float64.
The functions see a model only through ``log_joint(z) -> (S, B)`` (x bound by the caller) and
``init``, a distribution with batch shape (B,) and event shape (D,).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch.distributions import Distribution

from vae_cli.estimators import log_mean_exp
from vae_cli.model import VAE

LogJoint = Callable[[torch.Tensor], torch.Tensor]

# HMC step-size adaptation as in Wu et al. (2017): per (chain, example), multiply by 1.02 while the
# chain accepts more often than the target, by 0.98 otherwise, and clamp. "More often" is judged on
# an exponential moving average of the MH acceptance probability (about the last 1/(1-_DECAY)
# transitions), not on the rate since the start as in their code: that cumulative rate lags, so
# on long runs the step overshoots and late acceptance collapses (we measured ~0 at 200 steps).
_GROW, _SHRINK, _DECAY = 1.02, 0.98, 0.9
_STEP_MIN, _STEP_MAX = 1e-4, 1.0


def sigmoid_beta(t: int, steps: int, radius: float = 4.0) -> float:
    """beta_t of the sigmoid schedule, 0 <= t <= steps: 0 at t = 0 and 1 at t = steps, exactly.

    Grosse et al. (2015) and Wu et al. (2017): sigmoid(x_t) on x_t evenly spaced over [-radius,
    radius], rescaled to [0, 1]; small steps near both ends, where f_t changes fastest. One beta at a
    time, in float64: a chain asks for each once, and a schedule held whole grew with ``steps``
    (ais.steps=10^9 filled 24 GB before its first transition; the kernel killed the command).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least 1")
    if not 0 <= t <= steps:
        raise ValueError(f"t={t}: expected 0 <= t <= steps ({steps})")
    if t == steps:
        return 1.0  # (s1 - s0) / (s1 - s0) can round below 1 for some radius
    s0, s1 = _sigmoid(-radius), _sigmoid(radius)
    return (_sigmoid(-radius + 2.0 * radius * t / steps) - s0) / (s1 - s0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sigmoid_schedule(steps: int, radius: float = 4.0) -> torch.Tensor:
    """beta_0..beta_steps, (steps + 1,) float64, from 0 to 1 (sigmoid_beta at every t), for inspection."""
    return torch.tensor([sigmoid_beta(t, steps, radius) for t in range(steps + 1)], dtype=torch.float64)


def _log_f(log_joint: LogJoint, init: Distribution, z: torch.Tensor, beta: float):
    """(log q(z), log p(x, z), grad_z log f_beta(z)) at z (S, B, D); the first two (S, B), detached."""
    z = z.detach().requires_grad_(True)
    log_q, log_p = init.log_prob(z), log_joint(z)                    # (S, B) each
    # At the ends use one term alone: 0 * (-inf) would be NaN where q or p(x, z) has no mass.
    log_f = log_q if beta == 0.0 else log_p if beta == 1.0 else (1.0 - beta) * log_q + beta * log_p  # (S, B)
    grad, = torch.autograd.grad(log_f.sum(), z)                      # (S, B, D); w.r.t. z only
    return log_q.detach(), log_p.detach(), grad


def _hmc(log_joint: LogJoint, init: Distribution, z: torch.Tensor, log_q: torch.Tensor, log_p: torch.Tensor,
         grad: torch.Tensor, beta: float, step: torch.Tensor, leapfrog: int):
    """One HMC transition leaving f_beta invariant (Neal 2011): ``leapfrog`` leapfrog steps of size
    ``step`` (S, B, 1), then Metropolis-Hastings. Returns the new z (S, B, D), ``accept`` (S, B)
    and the acceptance probability min(1, exp(H0 - H1)) (S, B). log_q, log_p and grad are at z.

    The energy is H = -log f_beta(z) + |v|^2 / 2; a NaN or +inf proposed energy is rejected, so a
    chain whose trajectory leaves the model's domain stays where it was.
    """
    def energy(log_q: torch.Tensor, log_p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        log_f = log_q if beta == 0.0 else log_p if beta == 1.0 else (1.0 - beta) * log_q + beta * log_p
        return -log_f + 0.5 * (v * v).sum(-1)                        # (S, B)

    v = torch.randn_like(z)                                          # (S, B, D) momentum
    h0 = energy(log_q, log_p, v)
    z1, v1 = z, v + 0.5 * step * grad                                # half step in momentum
    for i in range(leapfrog):
        z1 = z1 + step * v1                                          # full step in position
        q1, p1, g1 = _log_f(log_joint, init, z1, beta)
        v1 = v1 + (0.5 if i == leapfrog - 1 else 1.0) * step * g1    # full step, half at the end
    h1 = energy(q1, p1, v1)
    log_alpha = torch.nan_to_num(h0 - h1, nan=-math.inf).clamp(max=0.0)  # (S, B) log MH acceptance prob
    u = torch.rand(h0.shape, dtype=h0.dtype, device=h0.device)
    accept = torch.log(u) < log_alpha                                # (S, B); non-finite h1 -> reject
    z = torch.where(accept.unsqueeze(-1), z1.detach(), z)            # (S, B, D)
    return z, accept, log_alpha.exp()


def _anneal(log_joint: LogJoint, init: Distribution, z: torch.Tensor, steps: int, reverse: bool, leapfrog: int,
            step_size: float, target_accept: float, stats: dict | None) -> torch.Tensor:
    """AIS along the sigmoid schedule, 0 -> 1 (reverse: 1 -> 0), from z (S, B, D) drawn from its first
    f: log weights (S, B) float64.

    Step t adds (beta_t - beta_{t-1}) (log p(x, z) - log q(z)), i.e. log f_t - log f_{t-1} at the
    current z, then applies one HMC transition for f_t (Neal 2001, eq. 2; Wu et al. 2017, alg. 1).
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: expected at least 1")
    if leapfrog < 1:
        raise ValueError(f"leapfrog={leapfrog}: expected at least 1")
    if not 0.0 < target_accept < 1.0 or not step_size > 0.0:
        raise ValueError(f"target_accept={target_accept}, step_size={step_size}: expected 0 < target_accept < 1 "
                         "and step_size > 0")
    with torch.enable_grad():                                        # callers may be under no_grad
        S, B = z.shape[:2]
        log_w = torch.zeros(S, B, dtype=torch.float64, device=z.device)
        step = torch.full((S, B, 1), float(step_size), dtype=z.dtype, device=z.device)
        recent = torch.full((S, B), float(target_accept), dtype=z.dtype, device=z.device)  # EMA of acceptance
        rates = []                                                   # kept only for stats
        before = sigmoid_beta(steps if reverse else 0, steps)
        for t in range(1, steps + 1):
            beta = sigmoid_beta(steps - t if reverse else t, steps)
            log_q, log_p, grad = _log_f(log_joint, init, z, beta)
            log_w += (beta - before) * (log_p.double() - log_q.double())
            z, accept, alpha = _hmc(log_joint, init, z, log_q, log_p, grad, beta, step, leapfrog)
            before = beta
            recent = _DECAY * recent + (1.0 - _DECAY) * alpha
            above = (recent > target_accept).unsqueeze(-1)           # (S, B, 1)
            step = (step * torch.where(above, _GROW, _SHRINK)).clamp(_STEP_MIN, _STEP_MAX)
            if stats is not None:
                rates.append(accept.double().mean())
    if stats is not None:
        stats["accept"] = torch.stack(rates).cpu()                  # (steps,) mean acceptance per transition
        stats["step_size"] = step.squeeze(-1).detach()              # (S, B) final step sizes
        stats["z"] = z.detach()                                      # (S, B, D) final states
    return log_w


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed the global RNG for the block and restore it afterwards (a no-op when seed is None).

    ``init.sample`` takes no generator, so determinism goes through the global RNG.
    """
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def ais(log_joint: LogJoint, init: Distribution, *, steps: int, leapfrog: int, chains: int,
        step_size: float = 0.05, target_accept: float = 0.65, seed: int | None = None,
        stats: dict | None = None) -> torch.Tensor:
    """Forward AIS from ``init`` (q(z), batch (B,), event (D,)) to p(x, z): log weights (chains, B) float64.

    ``log_mean_exp(log_w, 0)`` estimates log p(x) per example; it is a stochastic lower bound
    (Neal 2001; Wu et al. 2017), exact as steps -> infinity. ``steps`` annealing steps on the sigmoid
    schedule, each one weight update and one HMC transition of ``leapfrog`` leapfrog steps; the step
    size starts at ``step_size`` and adapts per (chain, example) toward ``target_accept``.
    ``seed`` makes the run deterministic (the global RNG is seeded inside and restored after).
    ``stats``, if given, receives "accept" (steps,), the mean acceptance at each transition,
    "step_size" (chains, B), the final step sizes, and "z" (chains, B, D), the final states (the
    last transition, at beta = 1, does not change the weights but makes z approximate p(z|x)).

    The step size depends on the chain's own past, so strictly the chain is not Markov and the
    bound holds only up to that (small) effect; Wu et al. (2017) adapt in the same way.
    """
    with _seeded(seed):
        z = init.sample((chains,))                                   # (S, B, D) ~ f_0
        return _anneal(log_joint, init, z, steps, False, leapfrog, step_size, target_accept, stats)


def reverse_ais(log_joint: LogJoint, init: Distribution, z_exact: torch.Tensor, *, steps: int, leapfrog: int,
                chains: int, step_size: float = 0.05, target_accept: float = 0.65, seed: int | None = None,
                stats: dict | None = None) -> torch.Tensor:
    """Reverse AIS from exact posterior samples z_exact (B, D) back to ``init``: log weights (chains, B) float64.

    The chain is forward AIS on the reversed path f_T, ..., f_0 (Grosse, Ghahramani and Adams 2015):
    it starts at z ~ p(z|x) = f_T / p(x), and step t adds log f_{t-1}(z) - log f_t(z) (the same
    transitions in reverse order). Its weights estimate Z_0 / Z_T = 1 / p(x) without bias, so
    log_mean_exp(log_w, 0) is a stochastic lower bound on -log p(x), and

        -log_mean_exp(log_w, 0)   is a stochastic UPPER bound on log p(x).

    The returned values are these log weights themselves (log of estimates of 1/p(x)), not negated.
    Every chain starts from the same z_exact; options and ``stats`` as in ``ais``. The step sizes
    start again from ``step_size`` and adapt on the way back; they are not replayed from a forward run.
    """
    with _seeded(seed):
        z = z_exact.detach().expand(chains, *z_exact.shape).clone()  # (S, B, D)
        return _anneal(log_joint, init, z, steps, True, leapfrog, step_size, target_accept, stats)


def bdmc(model: VAE, n: int, *, steps: int, leapfrog: int, chains: int, batch_size: int = 100, seed: int = 0,
         step_size: float = 0.05, target_accept: float = 0.65,
         done: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Bidirectional Monte Carlo (Grosse et al. 2015; Wu et al. 2017) on n examples simulated from the model.

    Draws z ~ p(z), x ~ p(x|z), so z is an exact sample of p(z|x); runs forward AIS from
    ``model.proposal(x)`` (lower bound) and reverse AIS from z back to it (upper bound). On average
    over examples, upper - lower bounds the error of forward AIS with these settings on data like
    these; Wu et al. (2017) use it to choose the AIS settings for real data.
    Returns float64 tensors (n,): "lower", "upper", "gap" = upper - lower; and "x", the simulated data.
    Gradients are taken w.r.t. z only; the model's mode (train/eval) is the caller's choice.
    ``done``, if given, is called with the number of examples of each batch once both runs are over it.
    """
    lower, upper, xs = [], [], []
    with _seeded(seed), torch.no_grad():
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            z = model.prior.sample((b,))                             # (b, D)
            x = model.decode(z).sample()                             # (b, C, H, W)
            q = model.proposal(x)                                    # batch (b,), event (D,)
            opts = dict(steps=steps, leapfrog=leapfrog, chains=chains, step_size=step_size,
                        target_accept=target_accept)
            f = ais(lambda zz: model.log_joint(x, zz), q, **opts)     # (S, b)
            r = reverse_ais(lambda zz: model.log_joint(x, zz), q, z, **opts)
            lower.append(log_mean_exp(f))
            upper.append(-log_mean_exp(r))
            xs.append(x)
            if done is not None:
                done(b)
    out = {"lower": torch.cat(lower), "upper": torch.cat(upper)}
    out["gap"] = out["upper"] - out["lower"]
    out["x"] = torch.cat(xs)
    return out
