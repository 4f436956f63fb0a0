"""Milliseconds per training step of a model, outside Lightning: forward, backward and fused Adam.

    python bench/step_time.py "model=conv" "model=conv prior=vamp prior.components=100"
    python bench/step_time.py --threads 1 --batch 512 "experiment=ladder_vamp_cpu"

Each argument is one side: `vae train` overrides, composed from conf/ as `vae train` composes them,
the model built from the config. A step is what VAEModule's training step computes on the CPU:
the objective's terms on a batch of binary images (`objective.terms`), backward, Adam's update.
Lightning's loop, data loading and logging are left out, so a change to a model or a kernel shows
alone. The sides are interleaved round by round (--rounds, 10 steps each after 3 untimed ones),
and the fastest round of each is reported: this machine's speed wanders from minute to minute.
Prints one Markdown row per side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package of this checkout


def build(overrides: list[str], batch: int):
    """A step function for the composed config: (step(), parameter count)."""
    from hydra.utils import instantiate

    from vae_cli.checks import compose, resolved
    from vae_cli.cli import config_dir

    cfg = resolved(compose(str(config_dir()), "train", overrides))
    torch.manual_seed(0)
    model = instantiate(cfg["model"])
    objective = instantiate(cfg.get("objective") or {"_target_": "vae_cli.objectives.ELBO"})
    optimizer = instantiate(cfg["optimizer"])(model.parameters())
    x = (torch.rand(batch, *cfg["dataset"]["shape"]) < 0.2).float()  # (B, C, H, W) binary

    def step() -> None:
        loss = objective.terms(model, x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("sides", nargs="+", help='vae train overrides of each side, e.g. "model=conv"')
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    steps = {side: build(side.split(), a.batch) for side in a.sides}
    best = {side: float("inf") for side in a.sides}
    for step, _ in steps.values():
        for _ in range(3):  # untimed: lazy set-up, Adam's state
            step()
    for _ in range(a.rounds):
        for side, (step, _) in steps.items():
            t = time.perf_counter()
            for _ in range(10):
                step()
            best[side] = min(best[side], (time.perf_counter() - t) / 10)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  threads {a.threads}  batch {a.batch}")
    print("| overrides | parameters | ms/step | examples/s |\n| --- | --- | --- | --- |")
    for side, (_, n) in steps.items():
        print(f"| `{side or '(defaults)'}` | {n / 1e6:.2f}M | {best[side] * 1e3:.1f} | {a.batch / best[side]:.0f} |")


if __name__ == "__main__":
    main()
