"""`vae evaluate`: log p(x) by several estimators, the ELBO and the gap, side by side, with diagnostics.

Every estimator runs on the first examples of the split (IWAE on all of them, the costlier ones on
a prefix), example by example from the same pixels, so figures on a common prefix compare directly.
The headline log p(x) is the best estimate computed: exact quadrature where it ran (latent_dim <= 2),
else the highest of the sampling estimates (all are stochastic lower bounds, so the highest is the
tightest). The gap is taken against that estimate, on the examples it covers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, Field

from vae_cli.collapse import line as collapse_line
from vae_cli.collapse import report as collapse_report
from vae_cli.data import Batches
from vae_cli.diagnostics import KHAT_BAD, ess, pareto_khat
from vae_cli.estimators import (bits_per_dim, curve_ks, estimate, log_mean_exp, log_px_curve, log_weights,
                                mean_and_stderr, refine)
from vae_cli.logs import say
from vae_cli.model import VAE
from vae_cli.runs import FromDataSettings
from vae_cli.typed import STRICT, NonNegInt, PosFloat, PosInt


ESTIMATORS = ("iwae", "refined", "ais", "exact", "bdmc")
SAMPLING = ("iwae", "refined", "ais")          # estimators of log p(x) on the data, by sampling
WARN_SHARE = 0.1  # warn when more than this share of examples has Pareto k-hat > 0.7
UNCONVERGED = 5.0  # nats: a lower bound this far under IWAE on the same examples did not converge
LABELS = {"iwae": "IWAE", "refined": "refined q*", "ais": "AIS", "exact": "exact (quadrature)"}
Estimator = Literal["iwae", "refined", "ais", "exact", "bdmc"]


class Refined(BaseModel):
    """The refined proposal (Cremer et al. 2018): per-example Adam on a Gaussian's ELBO, then IS."""

    model_config = STRICT
    limit: PosInt = 1000              # the first N examples
    steps: PosInt = 100               # Adam steps per example (batched)
    lr: PosFloat = 0.05
    samples: PosInt = 8               # reparameterised draws per step
    restarts: NonNegInt | None = None  # extra starts at the best prior draws; None: 4 if latent_dim <= 2 else 0
    search: PosInt = 1024             # prior draws searched for those starts

    @staticmethod
    def check_settings(args: dict) -> None:
        """The restarts are distinct draws picked from the search's: no more of them than it draws
        (restarts=50 with search=2 was accepted, and restarts=10^9 sat at 0% until killed)."""
        from vae_cli.errors import SettingsClash

        restarts, search = args.get("restarts"), args.get("search", 1024)
        if isinstance(restarts, int) and isinstance(search, int) and restarts > search:
            raise SettingsClash(f"refined.restarts={restarts} is not allowed with refined.search={search}: the "
                                "restarts are picked from the search's prior draws; raise refined.search or lower "
                                "refined.restarts")


class AIS(BaseModel):
    """Annealed importance sampling with HMC (Neal 2001; Wu et al. 2017), from q* (or q) to p(x, z)."""

    model_config = STRICT
    limit: PosInt = 1000
    steps: PosInt = 200               # intermediate distributions
    leapfrog: PosInt = 5
    chains: PosInt = 8


class Exact(BaseModel):
    """log p(x) by adaptive quadrature over a latent space of 1 or 2 dimensions."""

    model_config = STRICT
    limit: PosInt = 200
    tol: PosFloat = 1e-3              # nats: stop refining when the estimate moves less than this


class BDMC(BaseModel):
    """Bidirectional Monte Carlo (Grosse et al. 2015) on data simulated from the model."""

    model_config = STRICT
    n: PosInt = 100
    steps: PosInt = 200
    leapfrog: PosInt = 5
    chains: PosInt = 8


class EvaluateSettings(FromDataSettings):
    """The settings of `vae evaluate` (conf/evaluate.yaml), beside those every command reading a run
    shares. A new setting: a typed field here (constraints in Annotated[..., Field(...)]) and its key
    in conf/evaluate.yaml; vae_cli.settings derives its check."""

    k: PosInt = 5000                # importance samples of IWAE and of the refined proposal
    limit: PosInt | None = None     # only the first N examples
    batch_size: PosInt = 100        # examples per batch
    chunk: Literal["auto"] | PosInt = "auto"  # (example, sample) pairs decoded at once; auto: default_rows
    estimators: Literal["auto"] | Estimator | Annotated[list[Estimator], Field(min_length=1)] = "auto"
    refined: Refined = Refined()
    ais: AIS = AIS()
    exact: Exact = Exact()
    bdmc: BDMC = BDMC()


class Plan(BaseModel):
    """What an evaluation computes: the estimators (IWAE first) and their settings."""

    k: PosInt = 5000
    estimators: tuple[str, ...] = ("iwae", "refined", "ais")
    refined: Refined = Refined()
    ais: AIS = AIS()
    exact: Exact = Exact()
    bdmc: BDMC = BDMC()

    @property
    def ais_init(self) -> str:
        """AIS starts from q* when the refined proposal covers every example AIS runs on."""
        refined = "refined" in self.estimators and self.refined.limit >= self.ais.limit
        return "refined" if refined else "encoder"

    def covers(self, name: str, n: int) -> int:
        """How many of n examples the estimator runs on."""
        if name not in self.estimators:
            return 0
        return n if name == "iwae" else min(n, getattr(self, name).limit)


def resolve_estimators(requested: str | list[str], latent_dim: int) -> tuple[str, ...]:
    """``auto``: IWAE, refined, AIS, and exact quadrature when latent_dim <= 2. IWAE always runs
    (the ELBO, the diagnostics and the curve come from its draws)."""
    from vae_cli.errors import UserError

    if requested == "auto":
        names = ["iwae", "refined", "ais"] + (["exact"] if latent_dim <= 2 else [])
    else:
        names = [requested] if isinstance(requested, str) else list(requested)
        if "exact" in names and latent_dim > 2:
            raise UserError(f"estimators=exact is not allowed for this model: quadrature needs latent_dim <= 2, "
                            f"and it has latent_dim={latent_dim}")
    return tuple(["iwae"] + [n for n in ESTIMATORS[1:] if n in names])


def _batch_estimates(model: VAE, x: torch.Tensor, start: int, n: int, plan: Plan, rows: int, ks: list[int]) -> dict:
    """Every estimator's per-example figures for the batch x (examples start .. start+len(x))."""
    r = estimate(model, x, plan.k, rows)
    out = {name: r[name] for name in ("elbo", "recon", "kl")}
    out["iwae"], out["iwae_ess"], out["iwae_khat"] = r["log_px"], ess(r["log_w"]), pareto_khat(r["log_w"])
    out["curve"] = log_px_curve(r["log_w"], ks).T                               # (B, len(ks))
    q_star = None
    if (m := plan.covers("refined", n) - start) > 0:
        q_star = _refined(model, x[:m], plan, rows, out)
    if (m := plan.covers("ais", n) - start) > 0:
        from vae_cli.ais import ais

        xs, s = x[:m], plan.ais
        # From q* where it was computed for these examples and is no worse than q(z|x) by the ELBO
        # (Wu et al. 2017 start from q; a better start needs fewer intermediate distributions and
        # finds the modes q misses). A diagonal q* can be far worse than the model's own q, for a
        # hierarchy with narrow conditionals p(z_1|z_2) (model=ladder): AIS then starts from q(z|x).
        from_q_star = plan.ais_init == "refined" and bool(out["refined_elbo"][:m].mean() >= out["elbo"][:m].mean())
        init = _head(q_star, m) if from_q_star else model.proposal(xs)
        lw = ais(lambda z: model.log_joint(xs, z), init, steps=s.steps, leapfrog=s.leapfrog, chains=s.chains)
        out["ais"], out["ais_from_refined"] = log_mean_exp(lw), torch.full((m,), float(from_q_star))
    if (m := plan.covers("exact", n) - start) > 0:
        from vae_cli.quadrature import exact_log_px

        out["exact"], info = exact_log_px(model, x[:m], tol=plan.exact.tol)
        out["exact_converged"] = info["converged"].double()
    return {name: v.detach().double().cpu() for name, v in out.items()}


def _refined(model: VAE, xs: torch.Tensor, plan: Plan, rows: int, out: dict):
    """The refined proposal q* for xs: its figures go into out; returns q* (AIS may start from it)."""
    s = plan.refined
    restarts = _restarts(s, model.latent_dim)
    stats: dict = {}
    q_star, out["refined_elbo"] = refine(lambda z: model.log_joint(xs, z), model.proposal(xs), model.prior,
                                         steps=s.steps, lr=s.lr, samples=s.samples, restarts=restarts, search=s.search,
                                         stats=stats)
    if "diverged" in stats:  # examples whose optimisation left the finite numbers (too large an lr)
        out["refined_diverged"] = stats["diverged"]
    lw = log_weights(lambda z: model.log_joint(xs, z), q_star, plan.k, rows)   # (k, m)
    out["refined"], out["refined_ess"], out["refined_khat"] = log_mean_exp(lw), ess(lw), pareto_khat(lw)
    return q_star


def _restarts(s: Refined, latent_dim: int) -> int:
    """The refined proposal's extra starts: refined.restarts, or where it is null 4 for a latent
    space of at most 2 dimensions (never more than the search draws), else 0."""
    return min(4, s.search) if s.restarts is None and latent_dim <= 2 else s.restarts or 0


def _head(q, m: int):
    """The first m examples of a batched mixture proposal (q* of refine)."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    comp = q.component_distribution.base_dist
    return MixtureSameFamily(Categorical(logits=q.mixture_distribution.logits[:m]),
                             Independent(Normal(comp.loc[:m], comp.scale[:m]), 1))


def default_rows(device: torch.device) -> int:
    """The (example, sample) pairs decoded at once where ``chunk=auto``: 512 on a CPU, 8192 on a GPU.

    Why: on a CPU a chunk whose activations stay in the caches is faster. IWAE on 100 MNIST test
    images, 2-core Intel Xeon: the default conv at k=500 took 8.6 to 10.8 s with 8192 pairs a chunk
    against 4.9 to 5.8 with 512 (its first feature map for 8192 decodes is 200 MB), the default mlp
    at k=1000 1.15 against 0.89 s (README, Speed). On a GPU fewer, larger kernels win.
    """
    return 512 if device.type == "cpu" else 8192


def check_memory(k: int, batch: int, device: torch.device, names: tuple[str, str] = ("k", "batch_size")) -> None:
    """Refuse, before any work, a k whose log weights cannot fit. A batch keeps all of its (k, B)
    float64 log weights (the diagnostics and the curve over k read them), and joining the chunks,
    the curve's partial sums and pareto_khat's sort copy them: up to about 20 x 8 k B bytes at the
    peak. Past the memory they would fill it chunk by chunk for minutes before anything failed."""
    from vae_cli.errors import UserError, available_memory

    need = 20 * 8 * k * batch
    have = available_memory(device)
    if have and need > have:
        raise UserError(f"{names[0]}={k} with batches of {batch} examples needs about {need / 1e9:.1f} GB for its log "
                        f"weights, more than the {have / 1e9:.1f} GB free on this {device.type.upper()}: lower "
                        f"{names[0]} or {names[1]}")


DECODE_BYTES = 16  # bytes a pixel of each image decoded at once, at the least (see check_decodes)


def check_decodes(count: int, asked: str, lower: str, pixels: int, device: torch.device,
                  per_pixel: int = DECODE_BYTES) -> None:
    """Refuse, before any work, a setting that decodes more images at once than can fit. Each decoded
    image holds at least 4 float32 copies of its pixels (the likelihood's parameters, the log-prob
    terms, their gradient where the estimator takes one, an activation): a lower bound, so this
    refuses only what cannot run (ais.chains=10^9 asked for 400 GB after the banner and a progress
    bar); nearer the limit the out-of-memory line still answers."""
    from vae_cli.errors import UserError, available_memory

    need = per_pixel * count * pixels
    have = available_memory(device)
    if have and need > have:
        raise UserError(f"{asked} decodes {count} images at once, about {need / 1e9:.1f} GB, more than the "
                        f"{have / 1e9:.1f} GB free on this {device.type.upper()}: lower {lower}")


def check_sizes(model: VAE, plan: Plan, n: int, pixels: int, batch_size: int, rows: int, device: torch.device,
                chunk: str | None = None) -> None:
    """Every size the plan's estimators hold at once, on n examples of `pixels` pixels, checked before
    anything is printed or written (a refusal after the banner printed two lines)."""
    b = min(batch_size, n)
    check_memory(plan.k, b, device)
    chunk = chunk or f"chunk={rows}"  # as given: chunk=auto (512 here) names what the user can change
    check_decodes(min(max(rows, b), plan.k * b), f"{chunk} with k={plan.k}", "chunk or k", pixels, device)
    if (m := min(b, plan.covers("refined", n))) > 0:
        s, restarts = plan.refined, _restarts(plan.refined, model.latent_dim)
        if restarts > 0:  # the search's prior draws, decoded together without gradients: 2 copies a pixel
            check_decodes(s.search * m, f"refined.search={s.search} with batches of {m} examples", "refined.search "
                          "or batch_size", pixels, device, per_pixel=DECODE_BYTES // 2)
        given = f"refined.samples={s.samples}" + (f" refined.restarts={restarts}" if restarts else "")
        lower = "refined.samples" + (" or refined.restarts" if restarts else "") + " or batch_size"
        check_decodes((1 + restarts) * s.samples * m, f"{given} with batches of {m} examples", lower, pixels, device)
    if (m := min(b, plan.covers("ais", n))) > 0:
        check_decodes(plan.ais.chains * m, f"ais.chains={plan.ais.chains} with batches of {m} examples",
                      "ais.chains or batch_size", pixels, device)
    if "bdmc" in plan.estimators:  # its AIS and IWAE run on batches of its own simulated examples
        m = min(BDMC_BATCH, plan.bdmc.n)
        check_memory(plan.k, m, device, names=("k", "bdmc.n"))
        check_decodes(plan.bdmc.chains * m, f"bdmc.chains={plan.bdmc.chains} with batches of {m} simulated "
                      "examples", "bdmc.chains or bdmc.n", pixels, device)


def evaluate_split(
    model: VAE, images: torch.Tensor, pixels: str, plan: Plan | None = None, batch_size: int = 100,
    rows: int | None = None, seed: int = 0, progress: bool = False,
) -> dict[str, Any]:
    """Evaluate uint8 images (N, C, H, W) with the plan's estimators; means and standard errors in nats.

    ``pixels`` is the mode the model was trained with (see vae_cli.data); dynamic binarization
    and dequantization use one fixed draw seeded by ``seed``, so figures compare across runs.
    ``rows``: the (example, sample) pairs decoded at once; None: default_rows of the model's device.
    """
    plan = plan or Plan()
    device = next(model.parameters()).device
    check_memory(plan.k, min(batch_size, len(images)), device)
    rows = rows or default_rows(device)
    torch.manual_seed(seed + 1)  # the draws z; the pixel noise below has its own stream (seed)
    batches = Batches(images.to(device), batch_size, pixels, shuffle=False, seed=seed, fixed_noise=True)
    n, ks, parts, start = len(images), curve_ks(plan.k), {}, 0
    with _progress(n, f"{'+'.join(plan.estimators)} k={plan.k}", progress) as bar:
        for x in batches:
            for name, v in _batch_estimates(model, x, start, n, plan, rows, ks).items():
                parts.setdefault(name, []).append(v)
            start += len(x)
            bar.update(len(x))
    values = {name: torch.cat(v) for name, v in parts.items()}
    return summarize(values, plan, ks, math.prod(images.shape[1:]), pixels, gaussian_q(model))


def gaussian_q(model: VAE) -> bool:
    """Whether q(z|x) is one diagonal Gaussian over z, the family of the refined proposal's components
    (not a flow posterior, not a ladder's hierarchy)."""
    from vae_cli.posteriors import GaussianPosterior

    return isinstance(getattr(model, "posterior_module", None), GaussianPosterior)


def _progress(n: int, desc: str, show: bool):
    """A bar over n examples on stderr (tqdm's, disabled where not shown: its update and close do nothing)."""
    from tqdm import tqdm

    return tqdm(total=n, unit="ex", desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not show)


def summarize(values: dict[str, torch.Tensor], plan: Plan, ks: list[int], dims: int, pixels: str,
              gaussian_q: bool = True) -> dict[str, Any]:
    """The JSON of an evaluation from per-example figures: every estimator under its own key,
    the headline log p(x) (the best estimate), and the gap against it. ``gaussian_q``: whether the
    model's q(z|x) is a diagonal Gaussian (what the gap's split means, _gap_split)."""
    out: dict[str, Any] = {"n": len(values["elbo"]), "k": plan.k, "dims": dims, "pixels": pixels}
    for name in ("elbo", "recon", "kl"):
        out[name], out[f"{name}_se"] = mean_and_stderr(values[name])
    est = out["estimators"] = {name: _estimator(name, values) for name in plan.estimators if name in values}
    est["iwae"].update(k=plan.k, curve={"k": ks, "log_px": values["curve"].mean(0).tolist()})
    if "ais" in est:
        from_q_star = int(values["ais_from_refined"].sum())
        init = {0: "encoder", len(values["ais"]): "refined"}.get(from_q_star, f"refined on {from_q_star} examples")
        est["ais"].update(plan.ais.model_dump(), init=init)
    if "exact" in est:
        est["exact"].update(tol=plan.exact.tol, converged_share=values["exact_converged"].mean().item())
    _headline(out, values)
    out["comparison"] = _on_common_examples(values, est)
    if "refined" in est:
        est["refined"].update(plan.refined.model_dump(), k=plan.k, **_gap_split(values, out["log_px_estimator"], gaussian_q))
        if "refined_diverged" in values:
            est["refined"]["diverged"] = int(values["refined_diverged"].sum())
    out["bits_per_dim"] = {"elbo": bits_per_dim(out["elbo"], dims, pixels),
                           "log_px": bits_per_dim(out["log_px"], dims, pixels)}
    out["warnings"] = warnings_for(out)
    return out


def _estimator(name: str, values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One estimator's figures on the m examples it covered, with the encoder's ELBO and gap there."""
    m = len(values[name])
    e: dict[str, Any] = {"n": m}
    e["log_px"], e["log_px_se"] = mean_and_stderr(values[name])
    e["elbo"], e["elbo_se"] = mean_and_stderr(values["elbo"][:m])
    e["gap"], e["gap_se"] = mean_and_stderr(values[name] - values["elbo"][:m])
    if f"{name}_khat" in values:  # importance sampling with one proposal: its diagnostics
        khat, weights = values[f"{name}_khat"], values[f"{name}_ess"]
        fitted = khat[~khat.isnan()]                 # NaN: too few draws to fit a tail (k < 25)
        e["ess_mean"], e["ess_min"] = weights.mean().item(), weights.min().item()
        e["khat_bad_share"] = (fitted > KHAT_BAD).double().mean().item() if len(fitted) else None
        e["khat_max"] = fitted.max().item() if len(fitted) else None
    return e


def _gap_split(values: dict[str, torch.Tensor], best: str, gaussian_q: bool) -> dict[str, Any]:
    """Cremer et al. 2018: ELBO(q) <= ELBO(q*) <= log p(x), the gap split at ELBO(q*) into the
    amortization gap ELBO(q*) - ELBO(q) and the approximation gap log p(x) - ELBO(q*), both on the
    first m examples, those that the refined proposal and the best estimate both cover, so the two
    add up to log p(x) - ELBO there (the printed gap, where m is the headline's n). ``gaussian_q``:
    whether q(z|x) is a diagonal Gaussian, the family of q*; otherwise ELBO(q*) - ELBO(q) compares
    two families and is not the amortization gap (it may be negative)."""
    refined, elbo = values["refined_elbo"], values["elbo"]
    m = min(len(refined), len(values[best]))
    out: dict[str, Any] = {}
    out["elbo_refined"], out["elbo_refined_se"] = mean_and_stderr(refined)
    out.update(amortization_gap=(refined[:m] - elbo[:m]).mean().item(),
               approximation_gap=(values[best][:m] - refined[:m]).mean().item(), approximation_gap_from=best,
               gap_split_n=m, approximation_gap_n=m, gaussian_q=gaussian_q)
    return out


def _headline(out: dict[str, Any], values: dict[str, torch.Tensor]) -> None:
    """log_px: exact where computed, else the highest sampling estimate on the examples they share."""
    est = out["estimators"]
    sampling = [name for name in SAMPLING if name in est]
    common = min(est[name]["n"] for name in sampling)
    best = max(sampling, key=lambda name: values[name][:common].mean().item())
    out["log_px_sampling"], out["log_px_sampling_estimator"] = est[best]["log_px"], best
    out["log_px_sampling_se"], out["log_px_sampling_n"] = est[best]["log_px_se"], est[best]["n"]
    head = "exact" if "exact" in est else best
    e = est[head]
    out.update(log_px=e["log_px"], log_px_se=e["log_px_se"], log_px_estimator=head, log_px_n=e["n"],
               gap=e["gap"], gap_se=e["gap_se"])


def _on_common_examples(values: dict[str, torch.Tensor], est: dict[str, Any]) -> dict[str, Any]:
    """Every estimator's mean on the examples they all cover (the first m), with IWAE's curve over k
    there: the like-for-like comparison (and what the plot shows)."""
    names = [name for name in ("iwae", "refined", "ais", "exact") if name in est]
    m = min(est[name]["n"] for name in names)
    return {"n": m, "log_px": {name: values[name][:m].mean().item() for name in names},
            "elbo": values["elbo"][:m].mean().item(), "iwae_curve": values["curve"][:m].mean(0).tolist()}


def warnings_for(out: dict[str, Any]) -> list[str]:
    """One line each: where a figure should not be trusted, and what to run instead."""
    lines = []
    share = out["estimators"]["iwae"].get("khat_bad_share") or 0.0
    if share > WARN_SHARE:
        ran = [name for name in ("refined", "ais") if name in out["estimators"]]
        if out["log_px_estimator"] != "iwae":
            advice = f"the headline uses {LABELS[out['log_px_estimator']]}"
        elif ran:  # they ran and gave no higher estimate: not converged on this model
            advice = (f"{' and '.join(LABELS[name] for name in ran)} gave no higher estimate here: raise "
                      f"{' and '.join(f'{name}.steps' for name in ran)}")
        else:
            advice = "run estimators=[refined,ais] (AIS, or the refined proposal q*) for a trustworthy log p(x)"
        lines.append(f"Pareto k-hat > {KHAT_BAD} for {100 * share:.0f}% of examples: IWAE's log p(x) cannot be "
                     f"trusted there (q(z|x) misses posterior mass); {advice}")
    refined = out["estimators"].get("refined", {})
    if refined.get("diverged"):
        lr = f"{refined['lr']:g}".replace("e+", "e")  # 1e12 as it was typed, not 1e+12
        lines.append(f"refined q*: its optimisation went to NaN or infinity on {refined['diverged']} of {refined['n']} "
                     f"examples (refined.lr={lr} is too large for them); q* there is the best finite "
                     "Gaussian it passed through (at worst where it started, q(z|x)): lower refined.lr")
    # Every sampling estimate is a (stochastic) lower bound: one far below another on the same
    # examples did not converge there, whatever its standard error says.
    common = out["comparison"]
    for name in ("refined", "ais"):
        below = common["log_px"]["iwae"] - common["log_px"].get(name, math.inf)
        if below > UNCONVERGED:
            lines.append(f"{LABELS[name]} is {below:.1f} nats below IWAE on the same {common['n']} examples: it did not "
                         f"converge on this model{' (raise ais.steps)' if name == 'ais' else ''}, and the headline "
                         "does not use it")
    return lines


def table(r: dict[str, Any]) -> str:
    """The terminal table: nats per example with standard errors, bits/dim beside, then notes."""
    est, pixels = r["estimators"], r["pixels"]
    rows = [("ELBO", r["n"], r["elbo"], r["elbo_se"], "elbo")]
    for name in ("iwae", "refined", "ais", "exact"):
        if name in est:
            label = f"log p(x)  {LABELS[name]}" + (f" k={r['k']}" if name in ("iwae", "refined") else "")
            rows.append((label, est[name]["n"], est[name]["log_px"], est[name]["log_px_se"], None))
    rows += [("  recon  E_q log p(x|z)", r["n"], r["recon"], r["recon_se"], None),
             ("  KL(q(z|x) || p(z))", r["n"], r["kl"], r["kl_se"], None)]
    lines = [f"{'':32}{'examples':>9}{'nats/example':>14}{'± s.e.':>9}{'bits/dim':>10}"]
    for label, n, value, se, key in rows:
        bpd = bits_per_dim(value, r["dims"], pixels) if key or label.startswith("log p(x)") else None
        lines.append(f"{label:32}{n:9d}{value:14.3f}{se:9.3f}{(f'{bpd:.4f}' if bpd is not None else ''):>10}")
    head = LABELS[r["log_px_estimator"]]
    lines.append(f"log p(x) = {r['log_px']:.3f} ± {r['log_px_se']:.3f} ({head}, the best estimate, "
                 f"{r['log_px_n']} examples)")
    lines.append(f"gap = log p(x) - ELBO = {r['gap']:.3f} ± {r['gap_se']:.3f}, from {head} on its {r['log_px_n']} "
                 "examples: " + ("the KL(q(z|x) || p(z|x)), how far q is from the true posterior" if r["gap"] >= 0 else
                                 f"below 0, which the KL(q(z|x) || p(z|x)) it estimates cannot be: Monte Carlo noise of the two "
                                 "estimates" + (" (IWAE at k=1 is a one-sample ELBO)" if r["k"] == 1 else "")
                                 + "; raise k"))
    if "refined" in est:
        e = est["refined"]
        a, b, m = e["amortization_gap"], e["approximation_gap"], e["gap_split_n"]
        split = (f"amortization gap ELBO(q*) - ELBO(q) {a:.3f} + approximation gap log p(x) - ELBO(q*) {b:.3f}"
                 if e["gaussian_q"] else  # q* is Gaussian, q is not: a comparison of two families
                 f"ELBO(q*) - ELBO(q) {a:.3f} (q* Gaussian, q not: not the amortization gap) + "
                 f"log p(x) - ELBO(q*) {b:.3f}")
        lines.append(f"  gap on the first {m} examples {a + b:.3f} = {split}")
    for name in ("iwae", "refined"):
        if name in est and "ess_mean" in est[name]:
            e = est[name]
            share = e["khat_bad_share"]
            khat = (f"Pareto k-hat > {KHAT_BAD} for {100 * share:.1f}% of examples" if share is not None
                    else "Pareto k-hat: too few draws to fit (k < 25)")
            lines.append(f"{LABELS[name]}: ESS mean {e['ess_mean']:.1f}, min {e['ess_min']:.1f} of k={r['k']}; {khat}")
    curve = est["iwae"]["curve"]
    lines.append("IWAE over k: " + ", ".join(f"k={k} {v:.2f}" for k, v in zip(curve["k"], curve["log_px"])))
    if "bdmc" in r:
        b = r["bdmc"]
        lines.append(f"BDMC on {b['n']} simulated examples: {b['lower']:.3f} <= log p(x) <= {b['upper']:.3f} "
                     f"(width {b['width']:.3f}); IWAE k={r['k']} on them {b['iwae']:.3f}")
    if pixels == "none":
        lines.append("bits/dim: none, a Bernoulli on grey levels is not a probability of the data")
    elif pixels == "dequantize":
        lines.append("bits/dim: 8-bit images, dequantized x = (b + u)/256: -(log p(x) - D ln 256) / (D ln 2)")
    else:
        lines.append(f"bits/dim: per binarized pixel ({pixels} binarization), -log p(x) / (D ln 2)")
    if "collapse" in r:
        lines.append(collapse_line(r["collapse"]))
    lines += [f"warning: {w}" for w in r["warnings"]]
    return "\n".join(lines)


BDMC_BATCH = 100  # simulated examples at a time, for BDMC's AIS (bdmc()'s batch_size) and its IWAE


def run_bdmc(model: VAE, plan: Plan, rows: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """BDMC on simulated data, with IWAE on the same data: how far each is from the truth there.
    ``progress``: a bar for each of the two passes over the simulated examples (AIS both ways, IWAE)."""
    from vae_cli.ais import bdmc

    s = plan.bdmc
    with _progress(s.n, f"bdmc steps={s.steps} (simulated data)", progress) as bar:
        b = bdmc(model, s.n, steps=s.steps, leapfrog=s.leapfrog, chains=s.chains, batch_size=BDMC_BATCH, seed=seed,
                 done=bar.update)
    iwae = []
    with _progress(s.n, f"iwae k={plan.k} (simulated data)", progress) as bar:
        for x in b["x"].split(BDMC_BATCH):
            iwae.append(estimate(model, x, plan.k, rows)["log_px"].cpu())
            bar.update(len(x))
    iwae = torch.cat(iwae)
    out = {"n": s.n, "steps": s.steps, "leapfrog": s.leapfrog, "chains": s.chains}
    for name, v in (("lower", b["lower"]), ("upper", b["upper"]), ("iwae", iwae)):
        out[name], out[f"{name}_se"] = mean_and_stderr(v.cpu())
    out["width"] = out["upper"] - out["lower"]
    return out


def plot_curve(r: dict[str, Any], path: Path) -> None:
    """IWAE's log p(x) against k (log scale), with the other estimates as horizontal lines, all on
    the examples every estimator covers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = r["comparison"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(r["estimators"]["iwae"]["curve"]["k"], c["iwae_curve"], "o-", label="IWAE")
    for name, style in (("refined", "--"), ("ais", "-."), ("exact", ":")):
        if name in c["log_px"]:
            ax.axhline(c["log_px"][name], ls=style, color="k" if name == "exact" else f"C{'xra'.index(name[0])}",
                       label=LABELS[name])
    ax.axhline(c["elbo"], ls="-", color="grey", lw=0.8, label="ELBO")
    ax.set(xscale="log", xlabel="k (importance samples)", ylabel="log p(x), nats per example",
           title=f"log p(x) against k on {c['n']} examples: the curve should flatten")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def plan_of(cfg, latent_dim: int) -> Plan:
    """The Plan a `vae evaluate` config asks for."""
    from omegaconf import OmegaConf

    c = EvaluateSettings.model_validate(OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg)
    return Plan(k=c.k, estimators=resolve_estimators(c.estimators, latent_dim), refined=c.refined, ais=c.ais,
                exact=c.exact, bdmc=c.bdmc)


def evaluate(cfg) -> dict[str, Any]:
    """The `vae evaluate` command: load the model, estimate, print the table, write the JSON and the plot."""
    from vae_cli.data import run_split
    from vae_cli.runs import check_out, claimed_outputs, load_model, pick_device, run_dir_of

    device = pick_device(cfg.device)
    model, config, ckpt = load_model(cfg.run, cfg.ckpt, device=str(device))
    plan = plan_of(cfg, model.latent_dim)
    check_out(cfg.out, suffixes=(".json", ".png"))
    images, pixels = run_split(config, cfg.split, cfg.data_dir, getattr(model, "trained_data", None))
    if cfg.limit is not None:
        images = images[: cfg.limit]
    rows = default_rows(device) if cfg.chunk == "auto" else cfg.chunk
    # Every size refused before the banner and the claimed files: a refusal is its one line.
    check_sizes(model, plan, len(images), math.prod(images.shape[1:]), cfg.batch_size, rows, device,
                f"chunk=auto ({rows} here)" if cfg.chunk == "auto" else None)
    # Claimed before the work, so a bad output folder fails now, not after an hour of sampling;
    # a failure or Ctrl-C during the work removes the claimed (empty) files.
    with claimed_outputs(cfg.out, run_dir_of(ckpt) / "eval", f"{cfg.split}-k{cfg.k}", (".json", ".png")) as paths:
        say(f"vae evaluate: {cfg.split} split, {len(images)} examples, estimators {', '.join(plan.estimators)}, "
            f"k={cfg.k}, checkpoint {ckpt}")
        for name in plan.estimators[1:]:
            if name != "bdmc" and plan.covers(name, len(images)) < len(images):
                say(f"vae evaluate: {name} on the first {plan.covers(name, len(images))} examples "
                    f"(set {name}.limit to change)")
        r = evaluate_split(model, images, pixels, plan, cfg.batch_size, rows, cfg.seed, progress=True)
        if "bdmc" in plan.estimators:
            r["bdmc"] = run_bdmc(model, plan, rows, cfg.seed, progress=True)
        r["collapse"] = collapse_report(model, images, pixels, cfg.batch_size, cfg.seed)  # active units, KL per dim
        r.update(split=cfg.split, checkpoint=str(ckpt), seed=cfg.seed, likelihood=config["likelihood"]["_target_"])
        paths[0].write_text(json.dumps(r, indent=2) + "\n")
        plot_curve(r, paths[1])
    print(table(r))
    print("\n".join(f"wrote {p}" for p in paths))
    return r
