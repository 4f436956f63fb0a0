"""What compile=true buys a training step: vae's model and objective op by op against torch.compile'd, in one process.

    python bench/compile_speed.py --threads 2 experiment=pytorch_example     # any `vae train` overrides
    python bench/compile_speed.py --threads 2 model=conv
    python bench/compile_speed.py --threads 2 --repeats 2 --steps 5 --data-dir /tmp/benchdata   # smoke test

The step is what VAEModule runs under compile=true (vae_cli.module.compile_terms): the objective's
terms (encoder, q(z|x) and its draw, decoder, log p(x|z), KL; the config's objective, beta and
free_bits, the KL weight past any warm-up), backward, the optimizer's update, without Lightning.
One model, one optimizer; the two sides alternate on the same --steps batches, --repeats times,
so that a slow minute slows both. Printed: the compilation's time (at the first
compiled step; torch's on-disk cache makes a second run's far shorter), the median ms per step of
each side, and the median of the repeats' ratios compiled / op by op.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def setup(overrides: list[str], data_dir: str | None):
    """The module and optimizer `vae train OVERRIDES` builds, and its first training batches' loader."""
    from hydra.utils import instantiate

    from vae_cli.checks import compose, resolved
    from vae_cli.cli import config_dir
    from vae_cli.module import VAEModule
    from vae_cli.train import build_datamodule

    cfg = resolved(compose(str(config_dir()), "train", overrides + ([f"data_dir={data_dir}"] if data_dir else [])))
    data = build_datamodule(cfg)
    data.setup("fit")
    objective = instantiate(cfg.get("objective") or {"_target_": "vae_cli.objectives.ELBO"})
    module = VAEModule(instantiate(cfg["model"]), instantiate(cfg["optimizer"]), cfg["beta"], config=cfg,
                       objective=objective, free_bits=cfg.get("free_bits", 0.0))
    module.train()
    return module, module.configure_optimizers(), data.train_dataloader()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("overrides", nargs="*", help="vae train overrides, e.g. experiment=pytorch_example")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--steps", type=int, default=20, help="steps per side and repeat")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="vae's data_dir (default: the config's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from vae_cli.module import compile_terms

    module, optimizer, loader = setup(a.overrides, a.data_dir)
    batches = [x for _, x in zip(range(a.steps + 1), loader)]
    objective, model, w, free_bits = module.objective, module.model, module.beta, module.free_bits  # past any warm-up
    compiled = compile_terms(objective.terms)
    sides = {"op by op": lambda x: objective.terms(model, x, w, free_bits),
             "compiled": lambda x: compiled(model, x, torch.tensor(w), free_bits)}  # the KL weight as VAEModule gives it

    def step(terms, x: torch.Tensor) -> None:
        for p_ in model.parameters():
            p_.grad = None
        terms(x).loss.backward()
        optimizer.step()

    step(sides["op by op"], batches[0])  # as in a run: torch's KL table filled before compiling
    t0 = time.perf_counter()
    step(sides["compiled"], batches[0])
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"{' '.join(a.overrides) or '(defaults)'}  batch {len(batches[0])}", flush=True)
    print(f"compilation     {time.perf_counter() - t0:.1f} s (the first compiled step)")
    ms: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(a.repeats):
        for name, terms in sides.items():
            t0 = time.perf_counter()
            for x in batches[1:]:
                step(terms, x)
            ms[name].append((time.perf_counter() - t0) / a.steps * 1e3)
    for name, v in ms.items():
        print(f"{name:15} {statistics.median(v):.2f} ms/step (median of {a.repeats})")
    ratios = [c / e for c, e in zip(ms["compiled"], ms["op by op"])]
    print(f"compiled / op by op  median {statistics.median(ratios):.3f}  range {min(ratios):.3f} {max(ratios):.3f}")


if __name__ == "__main__":
    main()
