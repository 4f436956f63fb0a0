"""Checks that need a CUDA GPU; skipped where there is none (CI has none: they run when one is lent)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import pytorch_lightning as pl
import torch

from conftest import TINY, run_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = [a for a in TINY if not a.startswith(("trainer.accelerator", "trainer.log_every_n_steps"))]
GPU += ["trainer.accelerator=gpu", "trainer.log_every_n_steps=1000"]


class SyncCounter(pl.Callback):
    """Counts host synchronisations inside training steps (torch's sync debug mode), skipping the
    steps that read the KL or the loss on purpose (every 50th, for the collapse monitor)."""

    def __init__(self) -> None:
        self.syncs: list[str] = []   # where each synchronising call was made
        self.steps = 0
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % 50 == 0:
            return
        if module._graph is not None and module._graph.graph is None and module._graph_ready(batch_idx):
            return  # the step that captures the CUDA graph: torch.cuda.graph synchronises, once
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        # set_sync_debug_mode's own notice is not a sync; "called a synchronizing CUDA operation" is
        self.syncs += [f"{w.filename}:{w.lineno}" for w in self._caught
                       if "called a synchronizing" in str(w.message)]
        self.steps += 1
        self._catcher = None


@pytest.mark.parametrize("graph", ["true", "false"])
def test_a_training_step_never_waits_for_the_gpu(tmp_path, data_dir, monkeypatch, graph):
    counter = SyncCounter()
    real_trainer = pl.Trainer

    def trainer_with_counter(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), counter]
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_counter)
    assert run_main("train", f"data_dir={data_dir}", *GPU, "trainer.max_epochs=2", "eval.k=0", f"cuda_graph={graph}",
                    f"hydra.run.dir={tmp_path / 'gpu'}") == 0
    assert counter.steps >= 6 and not counter.syncs, f"host syncs in {counter.steps} steps at {counter.syncs[:5]}"


def test_evaluation_agrees_on_gpu_and_cpu(tmp_path, data_dir):
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *GPU, "eval.k=0", f"hydra.run.dir={run}") == 0
    out = {}
    for device in ("cpu", "cuda"):
        assert run_main("evaluate", f"run={run}", f"device={device}", "k=500", "estimators=[iwae]",
                        f"out={tmp_path / device}.json", f"data_dir={data_dir}") == 0
        out[device] = json.loads((tmp_path / f"{device}.json").read_text())["estimators"]["iwae"]
    cpu, gpu = out["cpu"], out["cuda"]
    # Different random draws on each device: agreement within Monte Carlo error (4 combined s.e.).
    assert cpu["n"] == gpu["n"] == 32
    assert abs(cpu["log_px"] - gpu["log_px"]) < 4 * math.hypot(cpu["log_px_se"], gpu["log_px_se"]), (cpu, gpu)


def test_pictures_are_made_on_the_gpu(tmp_path, data_dir):
    """reconstruct with n not a multiple of 8 pads its last row: the padding was made on the CPU."""
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *GPU, "eval.k=0", f"hydra.run.dir={run}") == 0
    for command, extra in [("reconstruct", "n=10"), ("sample", "n=10"), ("interpolate", "pairs=2"), ("traverse", "steps=3")]:
        assert run_main(command, f"run={run}", "device=cuda", extra, f"data_dir={data_dir}",
                        f"out={tmp_path / command}.png") == 0, command


def small_vae():
    from vae_cli.likelihoods import Bernoulli
    from vae_cli.model import VAE
    from vae_cli.networks import MLPDecoder, MLPEncoder

    torch.manual_seed(0)
    model = VAE(4, MLPEncoder([1, 28, 28], 4, [64]), MLPDecoder([1, 28, 28], 4, [64]), Bernoulli()).cuda()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def test_a_replayed_step_computes_what_the_step_computes():
    """Steps of a VAE as a CUDA graph and op by op, from the same weights and Adam state, on new
    batches each time: the same losses and weights. The loss here decodes E_q[z], so the two sides
    see the same numbers whatever random draws each would make."""
    from vae_cli.graphs import StepGraph

    def forward(model):
        def f(x):
            q = model.posterior(x)
            loss = -(model.decode(q.mean).log_prob(x) - torch.distributions.kl_divergence(q, model.prior)).mean()
            return loss, q.mean
        return f

    batches = [torch.rand(32, 1, 28, 28, device="cuda").bernoulli() for _ in range(5)]
    (eager, opt_e), (graphed, opt_g) = small_vae(), small_vae()
    for opt, model in ((opt_e, eager), (opt_g, graphed)):  # one ordinary step: Adam's state exists
        opt.zero_grad()
        forward(model)(batches[0])[0].backward()
        opt.step()
    step = StepGraph(forward(graphed), opt_g)
    for x in batches[1:]:
        opt_e.zero_grad()
        loss_e, mean_e = forward(eager)(x)
        loss_e.backward()
        opt_e.step()
        loss_g, mean_g = step(x)
        torch.testing.assert_close(loss_g, loss_e.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(mean_g, mean_e.detach(), rtol=1e-5, atol=1e-5)
    assert step.graph is not None
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_every_replay_draws_fresh_noise():
    """The captured step's random draws are new at each replay and standard normal."""
    from vae_cli.graphs import StepGraph

    model, opt = small_vae()
    x = torch.rand(32, 1, 28, 28, device="cuda").bernoulli()

    def forward(x):
        q = model.posterior(x)
        return -model.decode(q.rsample()).log_prob(x).mean(), torch.randn(1000, device=x.device)

    opt.zero_grad()
    forward(x)[0].backward()
    opt.step()
    step = StepGraph(forward, opt)
    draws = torch.stack([step(x)[1].clone() for _ in range(50)])  # (50, 1000)
    assert not torch.equal(draws[0], draws[1])
    assert abs(draws.mean().item()) < 4 / 50_000 ** 0.5 and abs(draws.std().item() - 1) < 0.02


# Every option's training step captures (a step that cannot falls back to op by op, with a warning).
OPTIONS = [[], ["model=conv"], ["objective=iwae", "objective.k=4", "objective.dreg=true"], ["prior=vamp"],
           ["posterior=iaf"], ["free_bits=0.1"], ["model=ladder", "model.inference=top_down"], ["model=resnet"]]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: " ".join(o) or "default")
def test_every_option_trains_as_a_cuda_graph(tmp_path, data_dir, option):
    args = [a for a in GPU if not a.startswith(("model.", "dataset.batch_size"))] if option else GPU
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *args, *option, "dataset.batch_size=32", "eval.k=0",
                    f"hydra.run.dir={run}") == 0
    log = (run / "train.log").read_text()
    assert "could not be captured" not in log and "not as a CUDA graph" not in log, log[-2000:]
    assert "captured as one CUDA graph at step 2 (batches of 32)" in log
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 * 4  # 2 epochs x 128/32 batches: every replay counted
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    val = json.loads((run / "metrics.json").read_text())["val_elbo"]
    assert math.isfinite(val)


def test_the_graph_is_captured_again_when_objective_start_passes(tmp_path, data_dir):
    """objective.start=0.5 over 2 epochs of 4 steps: the ELBO's step captured at step 2, the bound's at 5."""
    args = [a for a in GPU if not a.startswith(("model.", "dataset.batch_size"))]
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *args, "objective=iwae", "objective.k=4", "objective.start=0.5",
                    "dataset.batch_size=32", "eval.k=0", f"hydra.run.dir={run}") == 0
    log = (run / "train.log").read_text()
    assert "captured as one CUDA graph at step 2 (batches of 32), objective elbo" in log, log[-2000:]
    assert "captured as one CUDA graph at step 5 (batches of 32), objective iwae" in log, log[-2000:]


def test_a_graphed_run_learns_as_the_plain_one_does(tmp_path, data_dir):
    """The same run with and without the graph (different random draws: the warm-up draws too)."""
    vals = {}
    for graph in ("true", "false"):
        run = tmp_path / graph
        assert run_main("train", f"data_dir={data_dir}", *GPU, "trainer.max_epochs=20", "eval.k=0",
                        f"cuda_graph={graph}", f"hydra.run.dir={run}") == 0
        vals[graph] = json.loads((run / "metrics.json").read_text())["val_elbo"]
    assert abs(vals["true"] - vals["false"]) < 0.05 * abs(vals["false"]), vals


def test_a_diverging_graphed_run_stops_before_a_bad_checkpoint(tmp_path, data_dir):
    run = tmp_path / "nan"
    code = run_main("train", f"data_dir={data_dir}", *GPU, "optimizer.lr=1e30", "trainer.max_epochs=3",
                    f"hydra.run.dir={run}")
    assert code == 2
    assert all(torch.isfinite(v).all() for ckpt in run.glob("checkpoints/*.ckpt")
               for v in torch.load(ckpt, weights_only=True)["state_dict"].values())
