"""Seconds per epoch: `vae train experiment=pytorch_example` vs a plain-PyTorch loop of the same model.

Full runs (real MNIST from the vae cache; fetched there once if missing):

    python bench/train_speed.py --epochs 4                                  # 2-core CPU
    python bench/train_speed.py --device cuda --epochs 4 --repeats 1 \
        --variants "" "compile=true"                                        # a GPU, two vae variants

Smoke test:  python bench/train_speed.py --epochs 2 --limit-batches 2 --data-dir /tmp/benchdata

Both sides do per epoch what pytorch/examples vae/main.py does: a shuffled training pass, batch 128,
over the 60k training images (vae's train + val, as `dataset.validation: test` does), then a pass
over the 10k test images. The test pass uses batch 1000 on both sides (vae's dataset.eval_batch_size).
Model: MLP 784-400-20, Bernoulli likelihood on grey levels x = byte/255 (summed BCE with logits),
closed-form KL, fused Adam lr 1e-3 (one kernel per update, as vae's default optimizer).

- vae: the real CLI as a subprocess (own temp hydra.run.dir, eval.k=0), timed with perf_counter
  end to end, so per-epoch work such as checkpoints, pictures and logging is counted. Each
  --variants entry (extra overrides, "" for none) is a side of its own.
- plain: in this process, the data as one float tensor in memory on --device, no DataLoader, no
  Lightning, no host sync inside an epoch.

Start-up is cancelled: each side runs 1 and N epochs, and s/epoch = (t_N - t_1) / (N - 1), after one
untimed warm-up run (1 epoch, 1 batch) per side. A second figure, "in-run", comes from inside the
N-epoch run: the time between the ends of its first and last epochs over N - 1 (vae: the wall
times of the val/elbo events in its TensorBoard file; plain: its own clock). On a GPU, where an
epoch takes less than a second and vae's start-up 20 s give or take 2, only the in-run figure
resolves the difference. The runs are interleaved and repeated (--repeats,
default 3) and the fastest t_1 and t_N of each side are used: this machine's speed wanders by 20% or
more from minute to minute, and the fastest run is the one least disturbed. At smoke-test sizes the
difference is noise.
Threads: both sides use --threads T (default: torch's default here): torch.set_num_threads(T) for
the plain loop, OMP_NUM_THREADS=T and MKL_NUM_THREADS=T in the vae child's environment.

Prints a header (date, CPU or GPU model, torch version, threads), then one line per side (t_1, t_N,
s/epoch, and the final -ELBO in nats/example: vae's val loss on the test set, plain's test loss),
then the ratio of each vae side to plain (fastest against fastest), and the in-run ratio of each
repeat's pair of N-epoch runs, which ran one right after the other, with their median. A side that
fails is reported and left out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BATCH, TEST_BATCH = 128, 1000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """The CPU model, or the GPU's name."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU: {cpu_model()} ({os.cpu_count()} logical)"


def vae_command() -> list[str]:
    exe = Path(sys.executable).with_name("vae")  # the console script of this venv
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vae_cli.cli"]  # the package on PYTHONPATH


def epoch_ends(run: Path) -> list[float]:
    """The wall times (s) at which a vae run logged val/elbo: the end of each epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.wall_time for e in acc.Scalars("val/elbo")] if "val/elbo" in acc.Tags()["scalars"] else []


def in_run(ends: list[float]) -> float | None:
    """Seconds per epoch between the first and the last epoch's end; None with fewer than 2."""
    return (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) >= 2 else None


def time_vae(epochs: int, data_dir: str, limit: int | None, threads: int, tmp: Path,
             extra: tuple[str, ...] = ()) -> tuple[float, float, float | None] | None:
    """Seconds for one `vae train` run of `epochs` epochs, its final val loss (-ELBO) and its
    in-run seconds per epoch; None if it failed."""
    tmp.mkdir(exist_ok=True)
    run = tmp / f"vae-{epochs}-{time.time_ns()}"  # a new folder each run: vae never trains into an old one
    cmd = [*vae_command(), "train", "experiment=pytorch_example", f"trainer.max_epochs={epochs}", "eval.k=0",
           f"data_dir={data_dir}", f"hydra.run.dir={run}", *extra]
    if limit is not None:
        cmd += [f"trainer.limit_train_batches={limit}", f"trainer.limit_val_batches={limit}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = run.with_suffix(".log")
    with open(log, "w") as f:
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp).returncode
        seconds = time.perf_counter() - t0
    if rc != 0:
        print(f"# vae train failed (exit {rc}): {' '.join(cmd)}\n" + log.read_text()[-3000:], flush=True)
        return None
    return seconds, -json.loads((run / "metrics.json").read_text())["val_elbo"], in_run(epoch_ends(run))


class VAE(nn.Module):
    """pytorch/examples vae/main.py's model, decoder returning logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """-ELBO summed over the batch (one reparameterised sample)."""
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.fc4(F.relu(self.fc3(z)))
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return bce + kl


def time_plain(epochs: int, splits: dict[str, torch.Tensor], limit: int | None,
               device: str) -> tuple[float, float, float | None]:
    """Seconds for `epochs` epochs of the plain loop, the last test pass's mean -ELBO per example,
    and the in-run seconds per epoch."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    train = torch.cat([splits["train"], splits["val"]]).flatten(1).to(device).float() / 255  # (60000, 784)
    test = splits["test"].flatten(1).to(device).float() / 255                               # (10000, 784)
    n_train = min(math.ceil(len(train) / BATCH), limit or math.inf) * BATCH
    n_test = min(math.ceil(len(test) / TEST_BATCH), limit or math.inf) * TEST_BATCH
    test = test[:n_test]
    model = VAE().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    ends = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), device=device)[:n_train]
        for start in range(0, len(order), BATCH):
            opt.zero_grad()
            model.loss(train[order[start : start + BATCH]]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():  # summed on the device; one read at the end of the epoch
            test_loss = sum(model.loss(test[s : s + TEST_BATCH]) for s in range(0, len(test), TEST_BATCH)).item()
        ends.append(time.perf_counter())
    return time.perf_counter() - t0, test_loss / len(test), in_run(ends)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--epochs", type=int, default=4, help="N: runs of 1 and N epochs (N >= 2)")
    p.add_argument("--data-dir", default=os.path.expanduser(os.environ.get("VAE_DATA_DIR", "~/.cache/vae-cli")))
    p.add_argument("--limit-batches", type=int, default=None, help="train/test batches per epoch (smoke test)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the fastest of each is used")
    p.add_argument("--device", default="cpu", help="cpu or cuda: the plain loop's device and vae's accelerator")
    p.add_argument("--variants", nargs="*", default=[""],
                   help='vae sides: extra overrides each ("" none), e.g. "" "compile=true"')
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs must be at least 2")
    torch.set_num_threads(a.threads)

    from vae_cli.data import load_splits

    splits = load_splits("mnist", a.data_dir)  # fetches and caches MNIST once, before any timing
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {device_name(a.device)}  torch {torch.__version__}  "
          f"threads {a.threads}")
    print(f"# epochs 1 and {a.epochs}, limit_batches {a.limit_batches}, data_dir {a.data_dir}, "
          f"train {len(splits['train']) + len(splits['val'])}, test {len(splits['test'])}", flush=True)

    accelerator = "trainer.accelerator=" + ("gpu" if a.device.startswith("cuda") else "cpu")
    runs = {"plain": lambda e, limit, tmp: time_plain(e, splits, limit, a.device)}
    for v in a.variants:
        extra = (accelerator, *v.split())
        runs[f"vae {v}".strip()] = lambda e, limit, tmp, extra=extra: time_vae(e, a.data_dir, limit, a.threads, tmp, extra)
    times: dict[str, dict[int, list[float]]] = {name: {1: [], a.epochs: []} for name in runs}
    inside: dict[str, list[float]] = {name: [] for name in runs}  # in-run s/epoch of each N-epoch run
    loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp:
        for name, run in list(runs.items()):
            if run(1, 1, Path(tmp) / "warm-up") is None:  # warm-up, untimed: lazy set-up, cold file caches
                del runs[name]
        for rep in range(a.repeats):  # interleaved, so a slow spell of the machine hits both sides
            for name, run in list(runs.items()):
                for e in (1, a.epochs):
                    result = run(e, a.limit_batches, Path(tmp) / "timed")
                    if result is None:
                        del runs[name]
                        break
                    times[name][e].append(result[0])
                    loss[name] = result[1]
                    if e == a.epochs and result[2] is not None:
                        inside[name].append(result[2])
                else:
                    print(f"# repeat {rep + 1}: {name:28} t_1 {times[name][1][-1]:7.2f} s  t_{a.epochs} "
                          f"{times[name][a.epochs][-1]:7.2f} s", flush=True)
    per_epoch = {}
    for name in runs:  # the fastest of the repeats: the least disturbed by other work
        t1, tn = min(times[name][1]), min(times[name][a.epochs])
        per_epoch[name] = (tn - t1) / (a.epochs - 1)
        what = "test loss" if name == "plain" else "val loss (test set)"
        run_in = f"in-run {min(inside[name]):6.3f} s/epoch" if inside[name] else "in-run n/a"
        print(f"{name:28} t_1 {t1:8.2f} s  t_{a.epochs} {tn:8.2f} s  {per_epoch[name]:8.3f} s/epoch  {run_in}  "
              f"{what} {loss[name]:.2f} nats/example", flush=True)
    for name in runs:
        if name != "plain" and "plain" in per_epoch:
            both = inside[name] and inside["plain"]
            ratio_in = f", in-run {min(inside[name]) / min(inside['plain']):.2f}" if both else ""
            print(f"ratio {name}/plain: {per_epoch[name] / per_epoch['plain']:.2f}{ratio_in}")
            if both and len(inside[name]) == len(inside["plain"]):
                # Each repeat's two N-epoch runs ran one after the other: their ratio is paired in time.
                pairs = [v / p for v, p in zip(inside[name], inside["plain"])]
                print(f"  in-run ratio of each repeat: {' '.join(f'{r:.2f}' for r in pairs)}; "
                      f"median {statistics.median(pairs):.2f}")


if __name__ == "__main__":
    main()
