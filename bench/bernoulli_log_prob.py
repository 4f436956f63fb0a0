"""Microseconds per call: the Bernoulli log-density of vae_cli against torch's own, on a CPU.

    python bench/bernoulli_log_prob.py            # a training batch (128, 784) and an IWAE block (50, 100, 784)

Both compute sum_i x_i l_i - softplus(l_i) over the pixels of each image (torch: -BCE with logits,
Independent(Bernoulli(logits), 3).log_prob; vae_cli.likelihoods.Bernoulli: x l - max(l, 0) -
log(1 + exp(-|l|)) with a one-expression backward). Forward alone (no grad) and forward + backward,
the median of 7 rounds of 50 calls each, the two interleaved round by round, on torch's threads.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.distributions import Bernoulli, Independent

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package from this checkout
from vae_cli.likelihoods import Bernoulli as Ours  # noqa: E402


def torch_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return Independent(Bernoulli(logits=logits, validate_args=False), 3, validate_args=False).log_prob(x)


def ours_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return Ours()(logits).log_prob(x)


def main() -> None:
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print("| shape (logits) | pass | torch (us) | vae_cli (us) | ratio |\n| --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for shape in [(128, 1, 28, 28), (50, 100, 1, 28, 28)]:
        logits = (3 * torch.randn(shape, generator=g)).requires_grad_()
        x = (torch.rand(shape[-4:], generator=g) < 0.2).float()
        for backward in (False, True):
            times = {"torch": [], "ours": []}
            for _ in range(7):
                for name, f in (("torch", torch_log_prob), ("ours", ours_log_prob)):
                    t = time.perf_counter()
                    for _ in range(50):
                        if backward:
                            f(logits, x).sum().backward()
                        else:
                            with torch.no_grad():
                                f(logits, x)
                    times[name].append((time.perf_counter() - t) / 50 * 1e6)
            a, b = statistics.median(times["torch"]), statistics.median(times["ours"])
            print(f"| {tuple(shape)} | {'forward + backward' if backward else 'forward'} | {a:.0f} | {b:.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
