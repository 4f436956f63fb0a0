"""Microseconds per call: the two elementwise functions vae_cli computes itself, against torch's own.

    python bench/kernels.py            # on this machine's CPU, torch's default threads

- the Bernoulli log-density, sum_i x_i l_i - softplus(l_i) over each image's pixels: torch's
  Independent(Bernoulli(logits), 3).log_prob (-BCE with logits) against vae_cli.likelihoods.Bernoulli
  (x l - max(l, 0) - log(1 + exp(-|l|)), one-expression backward), on a training batch (128, 784) and
  an IWAE block of 50 draws for 100 images;
- the ELU: torch.nn.ELU (expm1) against vae_cli.networks.ELU (exp), on the ladder's hidden layer
  (128, 200) and the conv model's first feature map (128, 32, 14, 14);
- the VampPrior's density, log (1/K) sum_k N(z; mu_k, sigma_k^2): torch's Independent(Normal).log_prob
  over a (N, K, D) tensor and a logsumexp, against vae_cli.priors.EqualMixture (two float64 matmuls),
  for a training batch of the ladder's top latent (128 draws, K=500, D=50) and 1,000 draws.

Forward alone (no grad) and forward + backward; the median of 7 rounds of 50 calls each, torch's and
ours interleaved round by round. Prints one Markdown table.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributions import Bernoulli, Independent, Normal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout
from vae_cli.likelihoods import Bernoulli as OurBernoulli  # noqa: E402
from vae_cli.networks import ELU  # noqa: E402
from vae_cli.priors import EqualMixture  # noqa: E402


def median_us(f: Callable[[], torch.Tensor], backward: bool, rounds: list[float]) -> None:
    t = time.perf_counter()
    for _ in range(50):
        if backward:
            f().sum().backward()
        else:
            with torch.no_grad():
                f()
    rounds.append((time.perf_counter() - t) / 50 * 1e6)


def main() -> None:
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print("| function | input shape | pass | torch (us) | vae_cli (us) | ratio |\n| --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in [(128, 1, 28, 28), (50, 100, 1, 28, 28)]:
        logits = (3 * torch.randn(shape, generator=g)).requires_grad_()
        x = (torch.rand(shape[-4:], generator=g) < 0.2).float()
        theirs = Independent(Bernoulli(logits=logits, validate_args=False), 3, validate_args=False)
        cases.append(("Bernoulli log_prob", shape, lambda d=theirs, x=x: d.log_prob(x),
                      lambda logits=logits, x=x: OurBernoulli()(logits).log_prob(x)))
    for shape in [(128, 200), (128, 32, 14, 14)]:
        h = torch.randn(shape, generator=g).requires_grad_()
        cases.append(("ELU", shape, lambda h=h: torch.nn.functional.elu(h), lambda h=h: ELU()(h)))
    for n in (128, 1000):
        loc, scale = torch.randn(500, 50, generator=g), (0.5 * torch.randn(500, 50, generator=g)).exp()
        loc.requires_grad_(), scale.requires_grad_()
        z = torch.randn(n, 50, generator=g).requires_grad_()
        cases.append(("VampPrior log_prob", (n, 500, 50),
                      lambda z=z, loc=loc, scale=scale: torch.logsumexp(
                          Independent(Normal(loc, scale, validate_args=False), 1).log_prob(z[:, None]), -1),
                      lambda z=z, loc=loc, scale=scale: EqualMixture(
                          Independent(Normal(loc, scale, validate_args=False), 1)).log_prob(z)))
    for name, shape, theirs, ours in cases:
        for backward in (False, True):
            times: dict[str, list[float]] = {"torch": [], "ours": []}
            for _ in range(7):
                median_us(theirs, backward, times["torch"])
                median_us(ours, backward, times["ours"])
            a, b = statistics.median(times["torch"]), statistics.median(times["ours"])
            print(f"| {name} | {tuple(shape)} | {'forward + backward' if backward else 'forward'} | {a:.0f} | {b:.0f} "
                  f"| {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
