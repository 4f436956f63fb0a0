"""Priors (standard, VampPrior) and posteriors (Gaussian, IAF): densities, estimators, training, pictures, old checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, Normal
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY, run_main
from vae_cli.ais import ais
from vae_cli.checks import compose
from vae_cli.estimators import estimate, refine
from vae_cli.posteriors import IAFPosterior, diagonal_gaussian
from vae_cli.priors import EqualMixture
from vae_cli.quadrature import log_px_quadrature
from vae_cli.runs import check_config, load_model

OPTIONS = [("standard", "gaussian"), ("standard", "iaf"), ("vamp", "gaussian"), ("vamp", "iaf")]
SHAPE = [1, 6, 6]


def tiny_model(conf, prior: str, posterior: str, latent_dim: int = 3, seed: int = 0):
    """A small MLP VAE on 6x6 images with the given prior and posterior, float64."""
    over = [f"prior={prior}", f"posterior={posterior}", f"model.latent_dim={latent_dim}", "model.encoder.hidden=[16]",
            "dataset=folder", "dataset.path=/tmp", f"dataset.shape=[{','.join(map(str, SHAPE))}]"]
    over += ["prior.components=5"] if prior == "vamp" else []
    over += ["posterior.hidden=[8]", "posterior.context=4", "posterior.context_hidden=[8]"] if posterior == "iaf" else []
    cfg = OmegaConf.to_container(compose(conf, "train", over), resolve=True)
    torch.manual_seed(seed)
    model = instantiate(cfg["model"]).double()
    if posterior == "iaf":  # move the flow away from its identity start, so the test sees a real flow
        with torch.no_grad():
            for step in model.posterior_module.flow.transforms:
                step.transform.hyper[-1].weight.normal_(0, 0.3)
    return model.eval()


def test_flow_log_q_is_the_change_of_variables():
    """log q(z|x) = log N(z_0; mu, sigma) - log |det dz/dz_0|, with the Jacobian from autograd."""
    torch.manual_seed(0)
    d = 3
    post = IAFPosterior(SHAPE, d, transforms=2, hidden=[8], context=4, context_hidden=[8]).double()
    with torch.no_grad():
        for step in post.flow.transforms:
            step.transform.hyper[-1].weight.normal_(0, 0.5)
            step.transform.hyper[-1].bias.normal_(0, 0.5)
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    mu, logvar = torch.randn(2, d, dtype=torch.float64), torch.randn(2, d, dtype=torch.float64) * 0.3
    q = post(x, mu, logvar)
    z0 = diagonal_gaussian(mu, logvar).sample()                      # (2, D) base draws
    z_of = q.transform.inv                                            # z_0 -> z (the IAF sampling path)
    z = z_of(z0)
    for b in range(2):
        def one(v, b=b):
            full = z0.clone()
            full[b] = v
            return z_of(full)[b]
        J = torch.autograd.functional.jacobian(one, z0[b])            # (D, D)
        expected = diagonal_gaussian(mu[b], logvar[b]).log_prob(z0[b]) - torch.linalg.slogdet(J)[1]
        assert torch.allclose(q.log_prob(z)[b], expected, atol=1e-8)
    # and the log density of its own draw, computed along the way, agrees
    torch.manual_seed(1)
    z1, log_q1 = q.rsample_and_log_prob()
    assert torch.allclose(q.log_prob(z1), log_q1, atol=1e-8)
    assert not torch.allclose(q.log_prob(z), diagonal_gaussian(mu, logvar).log_prob(z))  # a real flow


@pytest.mark.parametrize("posterior", ["gaussian", "iaf"])
def test_vamp_prior_integrates_to_one_in_2d(conf, posterior):
    model = tiny_model(conf, "vamp", posterior, latent_dim=2)
    p = model.prior
    assert isinstance(p, EqualMixture) and p.batch_shape == () and p.event_shape == (2,)
    with torch.no_grad():
        log_z, _ = log_px_quadrature(lambda z: p.log_prob(z), 1, 2, tol=1e-4)
    assert abs(log_z.item()) < 1e-3
    z = p.sample((4, 3))
    assert z.shape == (4, 3, 2) and p.log_prob(z).shape == (4, 3)


def test_vamp_prior_is_the_mean_of_the_pseudo_input_posteriors(conf):
    model = tiny_model(conf, "vamp", "gaussian")
    u = model.prior_module.pseudo_inputs()
    assert u.shape == (5, *SHAPE) and u.min() >= 0 and u.max() <= 1
    z = torch.randn(7, 3, dtype=torch.float64)
    each = torch.stack([model.posterior(u[k : k + 1]).log_prob(z[:, None])[:, 0] for k in range(5)])   # (K, 7)
    assert torch.allclose(model.prior.log_prob(z), torch.logsumexp(each, 0) - math.log(5))
    # the draws follow the mixture: their mean is the mean of the component means
    torch.manual_seed(0)
    draws = model.prior.sample((20000,))
    assert torch.allclose(draws.mean(0), model.posterior(u).mean.mean(0), atol=0.05)


@pytest.mark.parametrize("prior,posterior", OPTIONS)
def test_elbo_iwae_ais_and_refine_are_finite_for_each_option(conf, prior, posterior):
    model = tiny_model(conf, prior, posterior)
    x = (torch.rand(4, *SHAPE, dtype=torch.float64) > 0.5).double()
    recon, kl = model.elbo_terms(x)
    assert recon.shape == kl.shape == (4,) and torch.isfinite(recon - kl).all()
    torch.manual_seed(0)
    out = estimate(model, x, k=64)
    assert all(torch.isfinite(out[key]).all() for key in ("log_px", "elbo", "kl", "recon"))
    assert (out["log_px"] >= out["elbo"] - 1e-9).all()               # L_k >= the mean of the log weights
    if (prior, posterior) == ("standard", "gaussian"):                 # closed form, as before
        assert torch.allclose(out["kl"], torch.distributions.kl_divergence(model.posterior(x), model.prior).double())
    log_w = ais(lambda z: model.log_joint(x, z), model.proposal(x), steps=5, leapfrog=2, chains=3, seed=0)
    assert log_w.shape == (3, 4) and torch.isfinite(log_w).all()
    q_star, elbo_star = refine(lambda z: model.log_joint(x, z), model.proposal(x), model.prior, steps=3, samples=4,
                               restarts=1, search=16, elbo_samples=8)
    assert torch.isfinite(elbo_star).all() and torch.isfinite(q_star.log_prob(q_star.sample((2,)))).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One short real `vae train` per non-default option, 2-d latents (so `vae manifold` runs too)."""
    runs = {}
    for prior, posterior in [("vamp", "gaussian"), ("standard", "iaf"), ("vamp", "iaf")]:
        out = tmp_path_factory.mktemp(f"{prior}-{posterior}")
        extra = ["prior.components=10"] if prior == "vamp" else []
        code = run_main("train", f"data_dir={data_dir}", *TINY, "trainer.max_epochs=1", "model.latent_dim=2",
                        f"prior={prior}", f"posterior={posterior}", *extra, f"hydra.run.dir={out}")
        assert code == 0
        runs[prior, posterior] = out
    return runs


@pytest.mark.parametrize("option", [("vamp", "gaussian"), ("standard", "iaf"), ("vamp", "iaf")])
def test_every_picture_command_runs_on_each_option(trained, option, tmp_path, capsys):
    run = trained[option]
    model, config, _ = load_model(str(run))
    assert config["model"]["prior"]["_target_"].endswith("VampPrior" if option[0] == "vamp" else "StandardNormal")
    for i, (command, args) in enumerate([("sample", ["n=4"]), ("sample", ["n=4", "mode=sample"]),
                          ("interpolate", ["pairs=2", "steps=3", "gif=true"]),
                          ("interpolate", ["pairs=2", "steps=3", "source=prior"]),
                          ("reconstruct", ["n=4"]), ("traverse", ["steps=3"]), ("manifold", ["steps=3"])]):
        out = tmp_path / f"{command}-{i}.png"
        assert run_main(command, f"run={run}", *args, f"out={out}") == 0, command
        assert out.stat().st_size > 0
    capsys.readouterr()
    if option[0] == "vamp":  # temperature scales N(0, I) only: one line, nothing written
        out = tmp_path / "hot.png"
        assert run_main("sample", f"run={run}", "temperature=0.5", f"out={out}") == 2
        assert "temperature=0.5 is not allowed" in capsys.readouterr().err and not out.exists()


def test_a_checkpoint_of_0_1_0_without_prior_or_posterior_still_loads(trained_run, tmp_path):
    """0.1.0 saved no prior/posterior keys and no weights for them: the default model, unchanged."""
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    config = ckpt["vae_cli"]["config"]
    for node in (config, config["model"]):
        node.pop("prior", None)
        node.pop("posterior", None)
    assert not any(k.startswith(("model.prior_module", "model.posterior_module")) for k in ckpt["state_dict"])
    check_config(config, "old")
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model, _, _ = load_model(ckpt=str(old))
    assert model.standard_prior and type(model.posterior_module).__name__ == "GaussianPosterior"
    new, _, _ = load_model(str(trained_run))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.encode(x), new.encode(x))
    assert run_main("sample", f"ckpt={old}", "n=4", f"out={tmp_path / 's.png'}") == 0


def test_mixture_density_by_matmuls_matches_torch_with_narrow_components():
    """EqualMixture's two float64 matmuls give torch's (N, K, D) density in float32 too, where the
    expansion of (z - mu)^2 / sigma^2 cancels terms of size 1e6, and the same gradients."""
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(50, 8, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.empty(50, 8, dtype=torch.float64).uniform_(-7, 0, generator=g))   # sigma in [1e-3, 1]
    z = loc[torch.randint(50, (40,), generator=g)] + scale[:1] * torch.randn(40, 8, generator=g, dtype=torch.float64)
    exact = torch.logsumexp(diagonal_gaussian(loc, 2 * scale.log()).log_prob(z[:, None]), -1) - math.log(50)
    f32 = EqualMixture(diagonal_gaussian(loc.float(), 2 * scale.log().float())).log_prob(z.float())
    # float32 inputs are rounded first: compare with the exact density of the rounded inputs
    exact32 = torch.logsumexp(diagonal_gaussian(loc.float().double(), 2 * scale.log().float().double())
                              .log_prob(z.float().double()[:, None]), -1) - math.log(50)
    assert f32.dtype == torch.float32 and torch.allclose(f32.double(), exact32, rtol=1e-6, atol=1e-4)
    half = EqualMixture(diagonal_gaussian(loc.float(), 2 * scale.log().float())).log_prob(z.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()   # mixed precision: never a float16 density
    assert exact.abs().max() > 1e3                                    # the narrow components matter here
    params = [p.clone().requires_grad_() for p in (z, loc, scale)]
    ours = EqualMixture(Independent(Normal(params[1], params[2]), 1)).log_prob(params[0]).sum()
    grads = torch.autograd.grad(ours, params)
    params2 = [p.clone().requires_grad_() for p in (z, loc, scale)]
    theirs = torch.logsumexp(Independent(Normal(params2[1], params2[2]), 1).log_prob(params2[0][:, None]), -1).sum()
    for a, b in zip(grads, torch.autograd.grad(theirs, params2)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8)
