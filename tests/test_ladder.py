"""model=ladder: a two-layer linear-Gaussian hierarchy with an exact log p(x) (both inference
models), the Chain densities (the top-down one recomputed by hand), and a real short run through
train, evaluate and sample.

    p(z2) = N(0, I), p(z1|z2) = N(A z2 + a, s1^2 I), p(x|z1) = N(W z1 + b, s^2 I)
    =>  p(x) = N(W a + b, W (A A^T + s1^2 I) W^T + s^2 I)
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.distributions import MultivariateNormal, Normal

from conftest import TINY, run_main
from linear_gaussian import SHAPE, FixedGaussian
from vae_cli.ais import ais
from vae_cli.estimators import iwae, log_mean_exp
from vae_cli.ladder import LadderVAE
from vae_cli.networks import bounded_logvar
from vae_cli.objectives import ELBO, IWAE

DX, D1, D2 = 6, 3, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny tensors, one thread


class Affine(nn.Module):
    """input (..., D_in) (or an image) -> (M h + m, logvar), a fixed linear-Gaussian layer."""

    def __init__(self, M: torch.Tensor, m: torch.Tensor, logvar: torch.Tensor, flatten: int = 0) -> None:
        super().__init__()
        self.M, self.m, self.logvar, self.flatten = M, m, logvar, flatten

    def forward(self, h: torch.Tensor):
        if self.flatten:
            h = h.flatten(-self.flatten)
        mu = h @ self.M.T + self.m
        return mu, self.logvar.expand_as(mu)


class UpAffine(Affine):
    """A linear step of the top-down model's bottom-up pass: input -> (d, M h + m, logvar), d the input
    (flattened): the next step sees x itself."""

    def forward(self, h: torch.Tensor):
        return (h.flatten(-self.flatten) if self.flatten else h, *super().forward(h))


def linear_ladder(seed: int = 0, s: float = 0.5, s1: float = 0.7, inflate: float = 1.3, inference: str = "bottom_up"):
    """A LadderVAE whose networks are the linear hierarchy above, float64, and
    bottom_up: q(z2|z1) = p(z2|z1) exactly and q(z1|x) the exact p(z1|x)'s mean with its diagonal
    variance (times ``inflate``);
    top_down (W with orthogonal columns): q(z1|z2, x) = p(z1|z2, x) exactly (the precision-weighted
    merge of p(z1|z2) with p(x|z1) as a Gaussian in z1, mean (W^T W)^-1 W^T (x - b), variance s^2 (W^T W)^-1)
    and q(z2|x) the exact p(z2|x)'s mean with its diagonal variance (times ``inflate``)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    W = torch.randn(DX, D1, generator=g, **f64)
    if inference == "top_down":                                 # W^T W diagonal
        W = torch.linalg.qr(W)[0] * torch.tensor([1.6, 1.0, 0.7], **f64)
    b = torch.randn(DX, generator=g, **f64)
    Q, _ = torch.linalg.qr(torch.randn(D1, D2, generator=g, **f64))
    A = Q * torch.tensor([1.5, 0.8], **f64)                     # orthogonal columns: p(z2|z1) diagonal
    a = torch.randn(D1, generator=g, **f64)
    model = LadderVAE(list(SHAPE), [D1, D2], [4], FixedGaussian(s), inference=inference).double()
    # p(z1|z2), p(x|z1)
    model.top_down[0] = Affine(A, a, torch.full((D1,), math.log(s1**2), **f64))
    model.decoder = _Linear(W, b)
    mean = W @ a + b
    cov = W @ (A @ A.T + s1**2 * torch.eye(D1, **f64)) @ W.T + s**2 * torch.eye(DX, **f64)
    if inference == "top_down":
        # bottom-up: (mu_hat_1, sigma_hat_1^2) = p(x|z1) as a Gaussian in z1; d_1 = x
        w2 = torch.diagonal(W.T @ W)
        M1 = W.T / w2[:, None]
        model.encoder[0] = UpAffine(M1, -M1 @ b, (s**2 / w2).log(), 3)
        # q(z2|x): p(z2|x) = N(A^T W^T cov^-1 (x - mean), I - A^T W^T cov^-1 W A)
        M2 = A.T @ W.T @ torch.linalg.inv(cov)
        S2 = torch.eye(D2, **f64) - M2 @ W @ A
        model.encoder[1] = UpAffine(M2, -M2 @ mean, (torch.diagonal(S2) * inflate).log())
        return model, MultivariateNormal(mean, covariance_matrix=cov)
    # q(z2|z1) = p(z2|z1) = N(S2 A^T (z1 - a) / s1^2, S2), S2 = (I + A^T A / s1^2)^-1 (diagonal)
    S2 = torch.linalg.inv(torch.eye(D2, **f64) + A.T @ A / s1**2)
    model.encoder[1] = Affine(S2 @ A.T / s1**2, -(S2 @ A.T @ a) / s1**2, torch.diagonal(S2).log())
    # p(z1|x) = N(C (Sigma1^-1 a + W^T (x - b) / s^2), C), C = (Sigma1^-1 + W^T W / s^2)^-1
    P1 = torch.linalg.inv(A @ A.T + s1**2 * torch.eye(D1, **f64))
    C = torch.linalg.inv(P1 + W.T @ W / s**2)
    model.encoder[0] = Affine(C @ W.T / s**2, C @ (P1 @ a - W.T @ b / s**2), (torch.diagonal(C) * inflate).log(), 3)
    return model, MultivariateNormal(mean, covariance_matrix=cov)


class _Linear(nn.Module):
    def __init__(self, W, b):
        super().__init__()
        self.W, self.b = W, b

    def forward(self, z1):
        return (z1 @ self.W.T + self.b).unflatten(-1, SHAPE)


@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_iwae_and_ais_find_the_exact_log_px_of_a_two_layer_linear_hierarchy(inference):
    torch.manual_seed(0)
    model, px = linear_ladder(inference=inference)
    x = px.sample((12,)).reshape(12, *SHAPE)
    truth = px.log_prob(x.flatten(1))
    est = iwae(model, x, k=20000)
    assert (est - truth).abs().max() < 0.03, (est - truth)
    lw = ais(lambda z: model.log_joint(x, z), model.proposal(x), steps=100, leapfrog=3, chains=64, seed=0)
    err = log_mean_exp(lw, 0) - truth                  # Monte Carlo error of 64 chains: a few hundredths
    assert err.abs().max() < 0.08 and err.mean().abs() < 0.02, err
    # a bound: below log p(x) on average; 1000 draws per example, as top_down's gap is only ~0.04 nats
    recon, kl = model.elbo_terms(x.repeat(1000, 1, 1, 1))
    assert (recon - kl).mean() < truth.mean()


def test_densities_are_the_sums_of_the_layers():
    torch.manual_seed(1)
    model, px = linear_ladder()
    x = px.sample((5,)).reshape(5, *SHAPE)
    q = model.proposal(x)
    assert q.batch_shape == (5,) and q.event_shape == (D1 + D2,)
    z = q.sample((7,))                                             # (7, 5, D)
    assert z.shape == (7, 5, D1 + D2)
    z1, z2 = z[..., :D1], z[..., D1:]

    def normal(mu, logvar, v):
        return Normal(mu, (0.5 * logvar).exp()).log_prob(v).sum(-1)

    by_hand = normal(*model.encoder[0](x), z1) + normal(*model.encoder[1](z1), z2)
    assert torch.allclose(q.log_prob(z), by_hand)
    log_prior = normal(torch.zeros(D2, dtype=z.dtype), torch.zeros(D2, dtype=z.dtype), z2) + normal(*model.top_down[0](z2), z1)
    assert torch.allclose(model.prior.log_prob(z), log_prior)
    assert torch.allclose(model.log_joint(x, z), model.decode(z).log_prob(x) + log_prior)
    # the draw and its log-density come from the same layers
    zr, log_q = q.rsample_and_log_prob((3,))
    assert torch.allclose(log_q, q.log_prob(zr))
    # the prior samples ancestrally: z1's covariance is A A^T + s1^2 I
    draws = model.prior.sample((20000,))
    assert draws.shape == (20000, D1 + D2)
    A = model.top_down[0].M
    cov = A @ A.T + 0.49 * torch.eye(D1, dtype=A.dtype)
    assert (draws[:, :D1].T.cov() - cov).abs().max() < 0.1
    assert model.encode(x).shape == (5, D1 + D2) and model.latent_dim == D1 + D2


def test_top_down_densities_are_the_precision_weighted_layers():
    """q(z|x) of the Ladder VAE (Sonderby et al. 2016) recomputed by hand from the networks, three layers."""
    torch.manual_seed(2)
    from vae_cli.likelihoods import Bernoulli

    model = LadderVAE([1, 4, 4], [3, 2, 2], [8, 6], Bernoulli(), inference="top_down").double()
    assert LadderVAE([1, 4, 4], [3, 2], [8], Bernoulli()).inference == "bottom_up"  # runs saved before the setting
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    q = model.proposal(x)
    assert q.batch_shape == (5,) and q.event_shape == (7,)
    z = q.sample((4,))                                             # (4, 5, 7)
    assert z.shape == (4, 5, 7)
    z1, z2, z3 = z[..., :3], z[..., 3:5], z[..., 5:]

    # the bottom-up pass, once per x: d_l the last tanh layer, (mu_hat_l, var_hat_l) its linear heads
    d, up = x.flatten(1), []
    for layer in model.encoder:
        d = layer.net[:-1](d)                                      # (5, 6)
        mu_hat, raw = layer.net[-1](d).chunk(2, -1)                # (5, D_l) each
        up.append((mu_hat, bounded_logvar(raw).exp()))

    def merged(l, z_above, generative):
        """q(z_l | z_{l+1}, x): precisions add, the mean is the precision-weighted average."""
        mu_hat, var_hat = up[l - 1]
        mu_p, logvar_p = generative(z_above)                       # (4, 5, D_l) each
        var_p = logvar_p.exp()
        var_q = 1 / (1 / var_hat + 1 / var_p)
        mu_q = (mu_hat / var_hat + mu_p / var_p) * var_q
        assert (var_q < var_hat).all() and (var_q < var_p).all()  # smaller than the bottom-up and the prior's
        return mu_q, var_q

    def normal(mu, var, v):
        return Normal(mu, var.sqrt()).log_prob(v).sum(-1)

    mu2, var2 = merged(2, z3, model.top_down[0])                   # top_down[0]: p(z2|z3)
    mu1, var1 = merged(1, z2, model.top_down[1])                   # top_down[1]: p(z1|z2)
    by_hand = normal(*up[2], z3) + normal(mu2, var2, z2) + normal(mu1, var1, z1)
    assert torch.allclose(q.log_prob(z), by_hand)
    zr, log_q = q.rsample_and_log_prob((3,))                       # the draw and its density agree
    assert zr.shape == (3, 5, 7) and torch.allclose(log_q, q.log_prob(zr))
    # encode: the top layer's mean, then each merged mean given the mean above
    code = model.encode(x)
    m3 = up[2][0]
    m2 = merged(2, m3, model.top_down[0])[0]
    m1 = merged(1, m2, model.top_down[1])[0]
    assert torch.allclose(code, torch.cat([m1, m2, m3], -1))


@pytest.mark.parametrize("inference", ["top_down", "bottom_up"])
def test_objectives_train_a_real_ladder(inference):
    torch.manual_seed(0)
    from vae_cli.likelihoods import Bernoulli

    model = LadderVAE([1, 4, 4], [3, 2, 2], [8], Bernoulli(), inference=inference)
    x = torch.rand(6, 1, 4, 4)
    for objective in (ELBO(), IWAE(k=3), IWAE(k=3, dreg=True)):
        t = objective.terms(model, x)
        t.loss.backward()
        assert torch.isfinite(t.loss) and t.kl.shape == (6,) and t.mean.shape == (6, 7)
        assert all(p.grad is not None for p in model.encoder.parameters())
        model.zero_grad()


@pytest.fixture(scope="module", params=["model.inference=top_down model.activation=elu", "model.inference=bottom_up",
                                        "prior=vamp prior.components=3"])
def ladder_run(request, tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("ladder")
    tiny = [o for o in TINY if not o.startswith(("model.", "trainer.max_epochs"))]
    code = run_main("train", f"data_dir={data_dir}", *tiny, "model=ladder", "model.latent_dims=[4,2]",
                    "model.hidden=[16]", *request.param.split(), "trainer.max_epochs=1", "eval.k=4",
                    f"hydra.run.dir={out}")
    assert code == 0
    return out


def test_train_evaluate_and_sample_a_ladder(ladder_run, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert run_main("evaluate", f"run={ladder_run}", "k=8", "limit=8", "refined.steps=5", "ais.steps=5",
                    "ais.chains=2", "ais.leapfrog=2", f"out={out}") == 0
    r = json.loads(out.read_text())
    assert math.isfinite(r["log_px"]) and math.isfinite(r["elbo"]) and r["n"] == 8
    png = tmp_path / "s.png"
    assert run_main("sample", f"run={ladder_run}", "n=4", f"out={png}") == 0 and png.exists()
    assert run_main("reconstruct", f"run={ladder_run}", "n=4", f"out={tmp_path / 'r.png'}") == 0
    assert run_main("interpolate", f"run={ladder_run}", "pairs=1", "steps=3", f"out={tmp_path / 'i.png'}") == 0
    capsys.readouterr()
    for command in ("traverse", "manifold"):
        assert run_main(command, f"run={ladder_run}", f"out={tmp_path / (command + '.png')}") == 2
        err = capsys.readouterr().err.strip()
        assert "stochastic layers" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / (command + ".png")).exists()
    assert run_main("sample", f"run={ladder_run}", "temperature=0.5", f"out={tmp_path / 't.png'}") == 2


def test_a_ladder_refuses_another_posterior_in_one_line(tmp_path, capsys):
    assert run_main("train", "model=ladder", "posterior=iaf", f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err.strip()
    assert "vae: error: posterior=iaf is not allowed with model=ladder" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting, allowed", [("inference=sideways", "top_down, bottom_up"),
                                              ("activation=relu", "tanh, elu")])
def test_a_ladder_refuses_an_unknown_setting_in_one_line(tmp_path, capsys, setting, allowed):
    assert run_main("train", "model=ladder", f"model.{setting}", f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err.strip()
    key, value = setting.split("=")
    assert f"model.{key}='{value}' is not allowed: expected one of {allowed}" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists(), err


@pytest.mark.parametrize("inference", ["top_down", "bottom_up"])
def test_activation_sets_every_hidden_unit_of_a_ladder(inference):
    from torch import nn

    from vae_cli.likelihoods import Bernoulli

    from vae_cli.networks import ELU

    for activation, unit in (("tanh", nn.Tanh), ("elu", ELU)):
        model = LadderVAE([1, 4, 4], [3, 2], [8, 6], Bernoulli(), inference=inference, activation=activation)
        units = [type(m) for m in model.modules() if isinstance(m, (nn.Tanh, nn.ELU, ELU))]
        # two hidden layers in each of: two encoder layers, p(z1|z2), p(x|z1)
        assert units == [unit] * 8, units
    assert LadderVAE([1, 4, 4], [3, 2], [8], Bernoulli()).decoder[1].__class__ is nn.Tanh  # runs saved before


def test_interpolation_walks_the_top_latent():
    """vae interpolate on a hierarchy: z_L moves along the path, the layers below are p's means."""
    from vae_cli.likelihoods import Bernoulli
    from vae_cli.pictures import interpolation_rows, pixels_of

    torch.manual_seed(0)
    model = LadderVAE([1, 4, 4], [3, 2], [8], Bernoulli(), inference="top_down")
    z0, z1 = model.encode(torch.rand(2, 1, 4, 4)).chunk(2)            # (1, 5) each
    path = model.from_top(torch.stack([model.top_latent(z0[0]), model.top_latent(z1[0])]))
    assert torch.equal(model.top_latent(path), torch.cat([model.top_latent(z0), model.top_latent(z1)]))
    assert torch.allclose(path[:, :3], model.top_down[0](path[:, 3:])[0])  # z_1 = E p(z_1|z_2)
    rows = interpolation_rows(model, z0, z1, steps=5)                  # (1, 5, 1, 4, 4)
    assert rows.shape == (1, 5, 1, 4, 4)
    assert torch.allclose(rows[0, [0, -1]], pixels_of(model, path))


@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_logvar_floor_bounds_every_generative_conditional(inference):
    from vae_cli.likelihoods import Bernoulli

    torch.manual_seed(0)
    model = LadderVAE([1, 4, 4], [3, 2, 2], [8], Bernoulli(), inference=inference, logvar_floor=-4.0)
    for layer in model.top_down:
        with torch.no_grad():
            layer.net[-1].bias.fill_(-30.0)  # a raw log-variance far below the floor
        _, logvar = layer(torch.randn(5, layer.net[0].in_features))
        assert (logvar > -4.0).all() and (logvar < -3.99).all()
    x = torch.rand(6, 1, 4, 4).bernoulli()
    assert torch.isfinite(model.log_joint(x, model.proposal(x).sample((3,)))).all()
    plain = LadderVAE([1, 4, 4], [3, 2, 2], [8], Bernoulli(), inference=inference)
    assert all(layer.logvar_floor is None for layer in plain.top_down)  # runs saved before: no floor


def test_logvar_floor_out_of_range_is_one_line(tmp_path, capsys):
    assert run_main("train", "model=ladder", "model.logvar_floor=-20", f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err.strip()
    assert "model.logvar_floor=-20" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("inference", ["bottom_up", "top_down"])
def test_vamp_prior_on_the_top_layer(inference):
    """prior=vamp: p(z) = (1/K) sum_k N(z_2; top_posterior(u_k)) p(z_1|z_2), a normalised density."""
    from vae_cli.priors import VampPrior
    from vae_cli.quadrature import log_px_quadrature

    torch.manual_seed(0)
    model = LadderVAE([1, 4, 4], [3, 2], [8], FixedGaussian(0.5), prior=VampPrior([1, 4, 4], 4),
                      inference=inference, activation="elu").double()
    with torch.no_grad():
        model.prior_module.pseudo_raw.uniform_(0, 1)                  # distinct pseudo-inputs
    u = model.prior_module.pseudo_inputs()                            # (K, 1, 4, 4)
    top = model.top_posterior(u)                                      # batch (K,), event (D2,)
    if inference == "top_down":
        expected = model.posterior(u).first
        assert torch.allclose(top.mean, expected.mean) and torch.allclose(top.stddev, expected.stddev)
    else:  # q(z2|z1) at z1 = the mean of q(z1|x): the top block of the code `encode` gives (q's mean path)
        assert torch.allclose(top.mean, model.encode(u)[:, D1:])
    z = torch.randn(5, 7, D1 + D2, dtype=torch.float64)
    z1, z2 = z.split([D1, D2], -1)
    mu, logvar = model.top_down[0](z2)
    log_top = torch.logsumexp(top.log_prob(z2[..., None, :]), -1) - math.log(4)          # (5, 7)
    by_hand = log_top + Normal(mu, (0.5 * logvar).exp()).log_prob(z1).sum(-1)
    assert torch.allclose(model.prior.log_prob(z), by_hand)
    with torch.no_grad():
        log_z, _ = log_px_quadrature(lambda v: model.prior.first.log_prob(v), 1, 2, tol=1e-4)
    assert abs(log_z.item()) < 1e-3                                   # p(z_2) integrates to 1
    draws = model.prior.sample((6,))
    assert draws.shape == (6, D1 + D2) and torch.isfinite(model.prior.log_prob(draws)).all()
    assert not model.prior.has_rsample and model.posterior(u).has_rsample
    with pytest.raises(NotImplementedError):
        model.prior.rsample((2,))                                     # no reparameterised draw through a mixture
    # the IWAE bound draws z (k, B, D); the pseudo-inputs learn through the prior
    t = IWAE(k=3).terms(model, torch.rand(5, 1, 4, 4, dtype=torch.float64))
    t.loss.backward()
    assert torch.isfinite(t.loss) and model.prior_module.pseudo_raw.grad.abs().sum() > 0
    # weights: the pseudo-inputs only with the VampPrior (a standard ladder's checkpoints are unchanged)
    assert [k for k in model.state_dict() if k.startswith("prior")] == ["prior_module.pseudo_raw"]
    plain = LadderVAE([1, 4, 4], [3, 2], [8], FixedGaussian(0.5), inference=inference)
    assert not [k for k in plain.state_dict() if k.startswith("prior")]
