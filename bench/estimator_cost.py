"""Each log p(x) estimator's cost per example at its defaults (vae evaluate's), and its figure.

    python bench/estimator_cost.py --run outputs/mlp --n 100

Loads the run's checkpoint, takes the first n test examples (the pixels `vae evaluate` uses), and
times each estimator alone on them, in this process, with perf_counter: IWAE (k draws), the
refined proposal (optimisation and its k draws), AIS (from q, so it stands alone; from q* it costs
the same), and exact quadrature where latent_dim <= 2. Prints one markdown table on stdout.
"""

from __future__ import annotations

import argparse
import time

import torch

from vae_cli.data import Batches, run_split
from vae_cli.estimators import estimate, log_mean_exp, log_weights, refine
from vae_cli.evaluate import AIS, Exact, Refined
from vae_cli.runs import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run folder")
    p.add_argument("--n", type=int, default=100, help="test examples (one batch)")
    p.add_argument("--k", type=int, default=5000)
    a = p.parse_args()
    torch.manual_seed(0)
    model, config, _ = load_model(run=a.run)
    images, pixels = run_split(config, "test")
    x = next(iter(Batches(images[: a.n], a.n, pixels, shuffle=False, seed=0, fixed_noise=True)))
    lj = lambda z: model.log_joint(x, z)  # noqa: E731
    rows = []

    def timed(name: str, settings: str, fn) -> None:
        t = time.perf_counter()
        value = fn()
        rows.append((name, settings, (time.perf_counter() - t) / a.n, value.mean().item()))

    timed("IWAE", f"k={a.k}", lambda: estimate(model, x, a.k)["log_px"])
    r = Refined()
    restarts = (4 if model.latent_dim <= 2 else 0) if r.restarts is None else r.restarts

    def refined() -> torch.Tensor:
        q, _ = refine(lj, model.proposal(x), model.prior, steps=r.steps, lr=r.lr, samples=r.samples,
                      restarts=restarts, search=r.search)
        return log_mean_exp(log_weights(lj, q, a.k))

    timed("refined q*", f"steps={r.steps}, samples={r.samples}, restarts={restarts}, k={a.k}", refined)
    s = AIS()
    from vae_cli.ais import ais

    timed("AIS from q", f"steps={s.steps}, leapfrog={s.leapfrog}, chains={s.chains}",
          lambda: log_mean_exp(ais(lj, model.proposal(x), steps=s.steps, leapfrog=s.leapfrog, chains=s.chains)))
    if model.latent_dim <= 2:
        from vae_cli.quadrature import exact_log_px

        timed("exact (quadrature)", f"tol={Exact().tol}", lambda: exact_log_px(model, x, tol=Exact().tol)[0])
    print(f"| estimator | settings | seconds/example | log p(x), {a.n} examples |\n|---|---|---|---|")
    for name, settings, sec, value in rows:
        print(f"| {name} | {settings} | {sec:.3f} | {value:.2f} |")


if __name__ == "__main__":
    main()
