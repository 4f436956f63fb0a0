"""Training objectives (ELBO, IWAE, DReG), free bits, the posterior-collapse report and warning, and the
warning for a run that diverges to a finite ELBO."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.distributions import Independent, Normal
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import linear_gaussian as lg
from conftest import TINY, run_main
from vae_cli.collapse import CollapseMonitor, DivergenceMonitor, UnitStats, report
from vae_cli.model import VAE
from vae_cli.module import VAEModule
from vae_cli.runs import load_model, warn_if_diverged
from vae_cli.objectives import ELBO, IWAE, _PosteriorLogProb, stopped_log_prob
from vae_cli.networks import MLPDecoder, MLPEncoder
from vae_cli.likelihoods import Bernoulli


class AffineEncoder(nn.Module):
    """q(z|x) = N(A x + c, diag exp(s)): a learnable encoder for the linear-Gaussian model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(0.3 * torch.randn(lg.DX, lg.DZ, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(0.1 * torch.randn(lg.DZ, generator=g, dtype=torch.float64))
        self.s = nn.Parameter(torch.full((lg.DZ,), -0.5, dtype=torch.float64))

    def forward(self, x):
        mu = x.flatten(1) @ self.A + self.c
        return mu, self.s.expand_as(mu)


def linear_model(seed: int = 0) -> tuple[VAE, torch.Tensor]:
    model, W, b, s = lg.make(seed)
    model.encoder = AffineEncoder(seed)
    return model, lg.data(model, 8)


def tiny_mlp(seed: int = 0) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(seed)
    model = VAE(3, MLPEncoder([1, 4, 4], 3, [8]), MLPDecoder([1, 4, 4], 3, [8]), Bernoulli())
    return model, torch.bernoulli(torch.full((16, 1, 4, 4), 0.4))


def test_iwae_with_one_sample_is_the_elbo_on_the_same_draw(one_thread):
    model, x = tiny_mlp()
    for w in (1.0, 0.3):
        torch.manual_seed(5)
        e = ELBO().terms(model, x, kl_weight=w)
        torch.manual_seed(5)
        i = IWAE(k=1).terms(model, x, kl_weight=w)
        torch.manual_seed(5)
        q = model.posterior(x)
        z = q.rsample()
        sampled_kl = q.log_prob(z) - model.prior.log_prob(z)
        assert torch.allclose(i.recon, e.recon) and torch.allclose(i.kl, e.kl)      # the same draw, the same ELBO
        assert torch.allclose(i.objective, (e.recon - w * sampled_kl).mean(), atol=1e-5)
    # and on average the ELBO objective's closed-form KL and IWAE(k=1)'s sampled one agree
    torch.manual_seed(0)
    xs = x.repeat(200, 1, 1, 1)
    with torch.no_grad():
        a, b = ELBO().terms(model, xs).objective, IWAE(k=1).terms(model, xs).objective
    assert abs(a - b) < 0.05


def test_iwae_bound_rises_with_k_and_stays_below_log_px(one_thread):
    model, _ = linear_model()
    x = lg.data(model, 200, seed=3)
    exact = lg.exact_log_px(x, model.decoder.W, model.decoder.b, model.likelihood.s).mean()
    torch.manual_seed(0)
    with torch.no_grad():
        bounds = [IWAE(k=k).terms(model, x).objective.item() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2] < exact.item() + 0.05


def _grads(model, x, objective, w, reps):
    """Per repetition, the gradient of the objective's loss for every parameter: {name: (reps, ...)}."""
    out = {}
    for _ in range(reps):
        model.zero_grad()
        objective.terms(model, x, kl_weight=w).loss.backward()
        for n, p in model.named_parameters():
            out.setdefault(n, []).append(p.grad.detach().clone())
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("w", [1.0, 0.5])
def test_dreg_gradients_have_the_iwae_expectation_and_less_variance(w, one_thread):
    model, x = linear_model()
    xs = x.repeat(40, 1, 1, 1)           # the batch mean averages 40 draws per repetition
    torch.manual_seed(1)
    plain = _grads(model, xs, IWAE(k=8), w, 40)
    torch.manual_seed(1)
    dreg = _grads(model, xs, IWAE(k=8, dreg=True), w, 40)
    for name in ("encoder.A", "encoder.c", "encoder.s"):
        a, b = plain[name], dreg[name]
        se = ((a.var(0) + b.var(0)) / len(a)).sqrt()
        z = ((a.mean(0) - b.mean(0)) / se).abs()
        assert z.max() < 4.5, (name, z)
        assert b.var(0).sum() < a.var(0).sum(), name     # the point of DReG


def test_dreg_leaves_the_decoder_gradient_as_it_is(one_thread):
    model, x = tiny_mlp()
    torch.manual_seed(1)
    plain = _grads(model, x, IWAE(k=8), 1.0, 1)
    torch.manual_seed(1)
    dreg = _grads(model, x, IWAE(k=8, dreg=True), 1.0, 1)
    for name in plain:
        same = torch.allclose(plain[name], dreg[name], atol=1e-7)
        assert same == name.startswith("decoder"), name


def test_dreg_without_a_gaussian_posterior_stops_the_whole_model():
    model, x = linear_model()
    q = model.posterior(x)
    z = q.sample((3,)).requires_grad_()
    fast = stopped_log_prob(model, x, q, z)
    from torch.func import functional_call

    detached = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    slow = functional_call(_PosteriorLogProb(model), detached, (x, z))
    assert torch.allclose(fast, slow)
    g = torch.autograd.grad(slow.sum(), [model.encoder.A], allow_unused=True, retain_graph=True)[0]
    assert g is None                                    # through z only
    assert torch.autograd.grad(slow.sum(), [z])[0].abs().sum() > 0


def test_free_bits_change_the_loss_only_below_the_threshold(one_thread):
    model, x = tiny_mlp()
    torch.manual_seed(2)
    base = ELBO().terms(model, x)
    per_dim = base.kl_dims.mean(0)                     # (D,) batch means
    low = per_dim.min().item() * 0.9
    torch.manual_seed(2)
    same = ELBO().terms(model, x, free_bits=low)
    assert torch.equal(same.loss, base.loss)
    high = per_dim.max().item() * 1.1
    torch.manual_seed(2)
    floored = ELBO().terms(model, x, free_bits=high)
    assert torch.allclose(floored.loss - base.loss, (high - per_dim).sum(), atol=1e-5)
    assert torch.equal(floored.recon, base.recon) and torch.equal(floored.kl, base.kl)  # the logged ELBO is unchanged
    # below the floor the KL gives the encoder no gradient: only recon does
    model.zero_grad()
    floored.loss.backward()
    g_floor = model.encoder.net[-1].bias.grad.clone()
    torch.manual_seed(2)
    q = model.posterior(x)
    model.zero_grad()
    (-model.decode(q.rsample()).log_prob(x).mean()).backward()
    assert torch.allclose(g_floor, model.encoder.net[-1].bias.grad, atol=1e-6)


def test_active_units_count_the_dimensions_the_mean_moves_along():
    stats = UnitStats()
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 0.3, 0.05, 0.0])  # variances 1, .09, .0025, 0
    stats.add(mean[:300], torch.ones(300, 4))
    stats.add(mean[300:], torch.ones(200, 4))
    assert stats.active_units() == 2 and stats.dims == 4
    assert torch.allclose(stats.kl_per_dim(), torch.ones(4, dtype=torch.float64))
    model, x = tiny_mlp()
    r = report(model, (x * 255).to(torch.uint8), "dynamic", batch_size=5)
    assert r["latent_dim"] == 3 and len(r["kl_per_dim"]) == 3 and 0 <= r["active_units"] <= 3


@pytest.mark.parametrize("kept", [1, 3, 256])
def test_an_epochs_sums_are_its_batches_however_often_they_are_added(monkeypatch, kept):
    """VAEModule keeps each batch's terms and adds them up every KEPT_BATCHES batches and at the
    epoch's end: the sums (elbo, recon, kl, objective) and the example count are those of the
    batches themselves, a last smaller batch included."""
    import vae_cli.module as module

    monkeypatch.setattr(module, "KEPT_BATCHES", kept)
    model, x = tiny_mlp()
    batches = [x[i:i + 3] for i in range(0, len(x), 3)]                       # sizes 3, 3, ..., and the rest
    m = VAEModule(model, torch.optim.Adam)
    torch.manual_seed(0)
    want = torch.zeros(4, dtype=torch.float64)
    for b in batches:
        t = m.objective.terms(model, b)
        r, k = t.recon.double().sum(), t.kl.double().sum()
        want += torch.stack([r - k, r, k, t.objective.double() * len(b)])
    torch.manual_seed(0)
    for b in batches:
        m.step(b, "val")
    got = m._add_batches("val")
    assert m._counts["val"] == len(x) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5)


def test_collapse_monitor_warns_once_and_only_on_collapse(caplog):
    caplog.set_level(logging.WARNING, logger="vae_cli")
    healthy = CollapseMonitor(after=10, window=5)
    for step in range(40):
        healthy.train_step(step, torch.full((8,), 3.0))
    healthy.validation(40, 3.0, 5, 8)
    healthy.train_epoch(40, 3.0)
    assert not caplog.records
    collapsed = CollapseMonitor(after=10, window=5)
    for step in range(40):
        collapsed.train_step(step, torch.full((8,), 1e-4))
    collapsed.validation(40, 1e-4, 0, 8)
    assert len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "posterior collapse" in line and "steps 6-10" in line
    assert all(word in line for word in ("kl_warmup_steps", "free_bits", "optimizer.lr"))


def test_divergence_monitor_warns_once_when_the_elbo_falls_far_below_its_best(caplog):
    caplog.set_level(logging.WARNING, logger="vae_cli")
    noisy = DivergenceMonitor()
    for epoch, elbo in enumerate([-540.0, -210.0, -120.0, -112.0, -113.5, -109.0, -118.9, -110.0]):
        assert not noisy.validation(epoch, 10 * epoch, elbo, lr=1e-3)   # under 10 nats below the best: noise
    assert not caplog.records
    diverged = DivergenceMonitor()
    said = [diverged.validation(e, 4 * e + 3, v, lr=3e-3, best_checkpoint="run/checkpoints/best-epoch=1-step=7.ckpt")
            for e, v in enumerate([-150.0, -106.25, -3.6e8, -2e8, -4e8])]
    assert said == [False, False, True, False, False] and len(caplog.records) == 1
    line = caplog.records[0].getMessage()
    assert "-106.25 (epoch 1, step 7)" in line and "-3.6e+08 (epoch 2, step 11)" in line
    assert "optimizer.lr=0.003, try 0.0015" in line
    assert "vae evaluate ckpt=run/checkpoints/best-epoch=1-step=7.ckpt" in line
    # Large ELBOs (a Gaussian likelihood): the margin is a tenth of the best's size.
    big = DivergenceMonitor()
    assert not any(big.validation(e, e, v) for e, v in enumerate([3000.0, 2750.0, 2980.0]))
    assert big.validation(3, 3, 2650.0) and "a smaller optimizer.lr" in caplog.records[-1].getMessage()
    caplog.clear()
    resumed = DivergenceMonitor()
    resumed.load_state_dict(diverged.state_dict())
    assert (resumed.best, resumed.best_epoch, resumed.diverged_epoch, resumed.last) == (-106.25, 1, 2, -4e8)
    assert not resumed.validation(5, 23, -5e8, lr=3e-3) and not caplog.records   # warned before the resume
    quiet = DivergenceMonitor()
    assert quiet.validation(0, 0, -100.0, say=False) is False and quiet.validation(1, 1, -500.0, say=False)
    assert quiet.diverged_epoch == 1 and not caplog.records                        # the other processes


def test_a_first_epoch_far_below_the_untrained_model_is_a_divergence(caplog):
    """Adam with lr=10 ruined the model in its first steps (val ELBO -1e12 from epoch 0 on): that
    epoch became the best, and nothing was said. The untrained model's val ELBO (Lightning's sanity
    check) is now the first best."""
    caplog.set_level(logging.WARNING, logger="vae_cli")
    ruined = DivergenceMonitor()
    ruined.untrained(-543.5)
    assert ruined.validation(0, 469, -1e12, lr=10.0, best_checkpoint="best-epoch=0.ckpt") is True
    line = caplog.records[0].getMessage()
    assert "fell from -543.50 (the untrained model) to -1e+12 (epoch 0, step 469)" in line and "try 5" in line
    assert "vae evaluate ckpt" not in line and ruined.best_checkpoint is None   # no checkpoint holds that model
    assert not ruined.validation(1, 938, -2e12, best_checkpoint="best-epoch=0.ckpt") and ruined.best_checkpoint is None
    caplog.clear()
    trains = DivergenceMonitor()
    trains.untrained(-543.5)
    assert not any(trains.validation(e, e, v) for e, v in enumerate([-540.0, -200.0, -120.0])) and not caplog.records
    assert (trains.best, trains.best_epoch) == (-120.0, 2)
    slow = DivergenceMonitor()                   # a first epoch a little below it (2 batches against all): noise
    slow.untrained(-543.5)
    assert not slow.validation(0, 1, -550.0) and not caplog.records
    resumed = DivergenceMonitor()
    resumed.load_state_dict(trains.state_dict())
    resumed.untrained(-90.0)                     # a resumed run's sanity check: its best stands
    assert (resumed.best, resumed.best_epoch) == (-120.0, 2)
    nan = DivergenceMonitor()
    nan.untrained(float("nan"))
    assert nan.best == -math.inf


def test_a_checkpoint_is_called_diverged_only_while_its_model_is_far_below_the_best(caplog, tmp_path):
    watch = DivergenceMonitor()
    for e, v in enumerate([-120.0, -100.0, -900.0]):
        watch.validation(e, e, v, best_checkpoint=f"best-epoch={e - 1}.ckpt" if e else None, say=False)
    checkpoint = {"vae_cli": {"divergence": watch.state_dict()}}
    with caplog.at_level(logging.WARNING, logger="vae_cli"):
        warn_if_diverged(checkpoint, tmp_path / "last.ckpt")
        assert len(caplog.records) == 1
        line = caplog.records[0].getMessage()
        assert "val ELBO -900" in line and "-100.00 at epoch 1" in line and "ckpt=best-epoch=1.ckpt" in line
        caplog.clear()
        watch.validation(3, 3, -101.0, say=False)  # back within 10 nats of its best: not called diverged
        warn_if_diverged({"vae_cli": {"divergence": watch.state_dict()}}, tmp_path / "last.ckpt")
        warn_if_diverged({"vae_cli": {"config": {}}}, tmp_path / "old.ckpt")     # saved before the monitor
        odd = {**watch.state_dict(), "last": "-900", "best_checkpoint": "x\ny"}     # not written by vae train
        warn_if_diverged({"vae_cli": {"divergence": odd}}, tmp_path / "odd.ckpt")
        assert not caplog.records


def blow_up_at(epoch: int):
    """An on_train_epoch_start that scales the decoder's weights by 30 at that epoch: finite, and far worse."""
    def blow_up(module):
        if module.current_epoch == epoch:
            with torch.no_grad():
                for p in module.model.decoder.parameters():
                    p.mul_(30.0)

    return blow_up


def test_a_run_that_diverges_to_a_finite_elbo_is_warned_about_and_names_its_best(tmp_path, data_dir, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(VAEModule, "on_train_epoch_start", blow_up_at(2), raising=False)
    run = tmp_path / "diverged"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=4", "eval.k=0", "scheduler=cosine",
                    f"hydra.run.dir={run}") == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "training diverged" in line]
    assert len(said) == 1 and "(epoch 1, step 8)" in said[0] and "(epoch 2, step 12)" in said[0], err
    assert "optimizer.lr=0.001," in said[0]        # the configured lr, not the cosine's decayed one
    s = {t: [e.value for e in _tb(run).Scalars(t)] for t in _tb(run).Tags()["scalars"]}
    assert all(math.isfinite(v) for v in s["val/elbo"]) and s["val/elbo"][2] < s["val/elbo"][1] - 10
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_val_elbo"] == pytest.approx(s["val/elbo"][1])
    assert (metrics["best_epoch"], metrics["diverged_epoch"]) == (1, 2)
    best = metrics["best_checkpoint"]
    assert Path(best).name == "best-epoch=1-step=8.ckpt" and Path(best).is_file()
    assert f"vae evaluate ckpt={best}" in said[0]
    summary = [line for line in out.splitlines() if line.startswith("best val ELBO:")]
    assert len(summary) == 1 and "(epoch 1; diverged at epoch 2)" in summary[0] and f"ckpt={best}" in summary[0]
    load_model(run=str(run))                      # reading it says so, and names the best
    said = [line for line in capsys.readouterr().err.splitlines() if "diverged to" in line]
    assert len(said) == 1 and "fell at epoch 2" in said[0] and f"ckpt={best}" in said[0], said
    load_model(ckpt=best)
    assert "diverged" not in capsys.readouterr().err
    # Resumed for one more epoch, it keeps its best from before the resume: no second warning.
    last = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["vae_cli"]["config"]["trainer"]["max_epochs"] = 5
    torch.save(ckpt, last)
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")   # the run's own config says so too
    saved.trainer.max_epochs = 5
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    monkeypatch.chdir(tmp_path)                    # Hydra's own folder for the resuming command
    assert run_main("train", f"resume={run}") == 0
    out, err = capsys.readouterr()
    assert "training diverged" not in err and "(epoch 1; diverged at epoch 2)" in out
    state = torch.load(last, weights_only=True)["vae_cli"]["divergence"]
    assert (state["best_epoch"], state["diverged_epoch"], torch.load(last, weights_only=True)["epoch"]) == (1, 2, 4)


def test_a_run_ruined_in_its_first_epoch_is_warned_about(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.setattr(VAEModule, "on_train_epoch_start", blow_up_at(0), raising=False)  # before the first step
    run = tmp_path / "ruined"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0",
                    f"hydra.run.dir={run}") == 0
    out, err = capsys.readouterr()
    said = [line for line in err.splitlines() if "training diverged" in line]
    assert len(said) == 1 and "(the untrained model) to " in said[0] and "(epoch 0, step 4)" in said[0], err
    assert "vae evaluate ckpt" not in said[0]     # its only checkpoints hold the ruined model
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["best_epoch"], metrics["diverged_epoch"], metrics["best_checkpoint"]) == (-1, 0, None)
    assert metrics["best_val_elbo"] > metrics["val_elbo"] + 10
    summary = [line for line in out.splitlines() if line.startswith("best val ELBO:")]
    assert len(summary) == 1 and "(the untrained model; diverged at epoch 0)" in summary[0] and "ckpt=" not in summary[0]
    load_model(run=str(run))
    said = [line for line in capsys.readouterr().err.splitlines() if "diverged to" in line]
    assert len(said) == 1 and "of the untrained model (it fell at epoch 0)" in said[0] and "the best model" not in said[0]


def test_a_kl_warm_up_to_a_large_beta_is_not_called_diverged(tmp_path, data_dir, capsys, monkeypatch):
    # The val ELBO (KL weight 1) may fall while the weight climbs: the check waits for the warm-up's end.
    monkeypatch.setattr(VAEModule, "on_train_epoch_start", blow_up_at(2), raising=False)
    run = tmp_path / "warm"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=4", "eval.k=0", "beta=4",
                    "kl_warmup_steps=100", f"hydra.run.dir={run}") == 0
    assert "training diverged" not in capsys.readouterr().err
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["vae_cli"]["divergence"]
    assert state["best_epoch"] == DivergenceMonitor.UNTRAINED and state["diverged_epoch"] is None  # no epoch judged


def _tb(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_the_healthy_tiny_run_logs_units_and_objective_and_no_warning(trained_run):
    acc = _tb(trained_run)
    s = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert s["train/objective"] == pytest.approx(s["train/elbo"]) and len(s["val/objective"]) == 2
    assert len(s["val/active_units"]) == 2 and s["val/active_units"][-1] >= 1
    assert "val/kl_per_dim" in acc.Tags()["histograms"]
    text = (trained_run / "train.log").read_text()
    assert "posterior collapse" not in text and "training diverged" not in text


def test_a_collapsing_run_is_warned_about_once(tmp_path, data_dir, capsys):
    # beta=200 forces q(z|x) onto the prior within the first epoch
    run = tmp_path / "collapse"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "beta=200", "optimizer.lr=0.01", "eval.k=0", "trainer.max_epochs=1",
                    f"hydra.run.dir={run}") == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "posterior collapse" in line]
    assert len(said) == 1 and "free_bits" in said[0], said
    assert "step 4" in said[0]                           # at the end of the first epoch (4 steps)


@pytest.mark.parametrize("args", [
    ["objective=iwae", "objective.k=3", "objective.dreg=true", "kl_warmup_steps=4", "beta=0.5"],
    ["free_bits=0.5", "kl_warmup_steps=2"],
])
def test_every_objective_option_trains_through_vae_train(tmp_path, data_dir, args):
    run = tmp_path / "run"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "eval.k=0", *args,
                    f"hydra.run.dir={run}") == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    s = {t: [e.value for e in _tb(run).Scalars(t)] for t in _tb(run).Tags()["scalars"]}
    assert math.isfinite(s["val/elbo"][0]) and math.isfinite(s["train/objective"][0])
    if "objective=iwae" in args:   # with beta < 1 and the warm-up the bound is not the ELBO
        assert s["train/objective"][0] != pytest.approx(s["train/elbo"][0])


def test_iwae_start_trains_on_the_elbo_until_then(tmp_path, data_dir):
    """objective.start=0.5 over 2 epochs of 4 steps: epoch 0 on the ELBO (its objective is the logged
    ELBO itself), epoch 1 on the 20-sample bound (above the ELBO by Jensen's inequality)."""
    run = tmp_path / "start"
    assert run_main("train", f"data_dir={data_dir}", *TINY, "objective=iwae", "objective.k=20", "objective.start=0.5",
                    "eval.k=0", f"hydra.run.dir={run}") == 0
    s = {t: [e.value for e in _tb(run).Scalars(t)] for t in _tb(run).Tags()["scalars"]}
    (o0, o1), (e0, e1) = s["train/objective"], s["train/elbo"]
    assert o0 == pytest.approx(e0, rel=1e-5), (o0, e0)
    assert o1 > e1 + 1.0, (o1, e1)


def test_the_training_objective_is_the_elbo_before_start():
    from test_scheduler import module_at

    for step, want in ((0, "elbo"), (74, "elbo"), (75, "iwae"), (100, "iwae")):
        m = module_at(step, 100)
        m.objective, m._elbo = IWAE(k=3, start=0.75), ELBO()   # replaces module_at's ELBO
        assert m.training_objective().name == want, step
    m = module_at(0, 100)
    m.objective, m._elbo = IWAE(k=3), ELBO()     # start=0: the bound from the first step
    assert m.training_objective() is m.objective


def test_objective_start_on_max_time_with_several_processes_is_refused():
    from types import SimpleNamespace

    from pytorch_lightning.callbacks import Timer
    from test_scheduler import module_at
    from vae_cli.errors import UserError

    m = module_at(0, math.inf)
    m.scheduler, m.objective = None, IWAE(k=3, start=0.5)
    assert m.follows_progress() == "objective.start=0.5"
    object.__setattr__(m, "_trainer", SimpleNamespace(estimated_stepping_batches=100, world_size=2, global_step=0,
                                                      callbacks=[Timer(duration={"seconds": 100})]))
    with pytest.raises(UserError, match=r"objective.start=0.5 with trainer.max_time is not allowed on several"):
        m._plan_schedule()


@pytest.mark.parametrize("args,message", [
    (["objective=iwae", "free_bits=0.5"], "free_bits=0.5 is not allowed with objective=iwae"),
    (["objective=iwae", "objective.k=0"], "objective.k=0 is not allowed"),
    (["objective=iwae", "objective.start=1"], "objective.start=1 is not allowed"),
    (["objective=iwae", "objective.start=0.5", "trainer.max_epochs=-1"], "objective.start=0.5 needs the run's end"),
    (["free_bits=-1"], "free_bits=-1"),
    (["objective.k=3"], "objective.k is a setting of objective=iwae: choose it first"),
])
def test_objective_mistakes_are_one_line(tmp_path, data_dir, args, message, capsys):
    assert run_main("train", f"data_dir={data_dir}", *TINY, *args, f"hydra.run.dir={tmp_path / 'x'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err[-3:]


def test_vae_evaluate_reports_active_units(trained_run_2d, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert run_main("evaluate", f"run={trained_run_2d}", "k=8", "limit=12", "estimators=iwae", f"out={out}") == 0
    assert "active units:" in capsys.readouterr().out
    r = json.loads(out.read_text())["collapse"]
    assert r["latent_dim"] == 2 and len(r["kl_per_dim"]) == 2 and len(r["posterior_mean_variance"]) == 2
