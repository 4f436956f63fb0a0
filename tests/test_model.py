"""The model's ELBO terms against the plain pytorch/examples formula, bounds, likelihoods, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vae_cli.callbacks import AtomicCheckpointIO
from vae_cli.checks import compose
from vae_cli.data import Batches
from vae_cli.likelihoods import Gaussian
from vae_cli.networks import LOGVAR_BOUND


def example_model(conf):
    cfg = OmegaConf.to_container(compose(conf, "train", ["experiment=pytorch_example"]), resolve=True)
    return instantiate(cfg["model"])


def test_fast_path_equals_the_pytorch_example_loss(conf):
    """Our in-memory batches and distributions give pytorch/examples vae/main.py's loss, same seed."""
    torch.manual_seed(0)
    model = example_model(conf)
    data = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    x = next(iter(Batches(data, 64, "none", shuffle=False)))       # grey levels, b / 255
    torch.manual_seed(1)
    recon, kl = model.elbo_terms(x)
    ours = -(recon - kl).sum()
    # pytorch/examples vae/main.py, written out with the same weights and the same noise
    torch.manual_seed(1)
    h = model.encoder.net(x.view(-1, 784))
    mu, raw = h.chunk(2, dim=-1)
    logvar = LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)         # |logvar| << 14 here: tanh is ~identity
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    logits = model.decoder.net(z)
    bce = F.binary_cross_entropy_with_logits(logits, x.view(-1, 784), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    assert torch.allclose(ours, bce + kld, rtol=1e-5)


def test_log_variance_is_bounded_so_nothing_overflows(conf):
    model = example_model(conf)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.mul_(1000.0)                                          # absurd weights
    recon, kl = model.elbo_terms(torch.rand(8, 1, 28, 28))
    assert torch.isfinite(recon).all() and torch.isfinite(kl).all()
    _, logvar = model.encoder(torch.rand(8, 1, 28, 28))
    assert logvar.abs().max() <= LOGVAR_BOUND   # tanh saturates to the bound in float32, never past it


@pytest.mark.parametrize("scale,n_params", [("fixed", 0), ("shared", 1), ("pixel", 12)])
def test_gaussian_likelihood_scales(scale, n_params):
    lik = Gaussian([3, 2, 2], scale=scale, sigma=0.2)
    assert sum(p.numel() for p in lik.parameters()) == n_params
    px = lik(torch.zeros(5, 3, 2, 2))
    assert px.batch_shape == (5,) and px.event_shape == (3, 2, 2)
    x = torch.full((5, 3, 2, 2), 0.5)                               # at the mean sigmoid(0) = 0.5
    assert torch.allclose(px.log_prob(x), torch.full((5,), -12 * math.log(0.2 * math.sqrt(2 * math.pi))))


def test_a_fixed_sigma_below_min_sigma_is_the_sigma_asked_for():
    """min_sigma floors the learned sigmas; scale=fixed sigma=1e-4 was refused (and would have been
    clamped to 1e-3)."""
    lik = Gaussian([1, 2, 2], scale="fixed", sigma=1e-4)
    assert torch.allclose(lik(torch.zeros(3, 1, 2, 2)).base_dist.scale, torch.full((3, 1, 2, 2), 1e-4))
    with pytest.raises(ValueError, match="min_sigma=0.001 is not allowed"):
        Gaussian([1, 2, 2], scale="shared", sigma=1e-4)


def test_bernoulli_likelihood_is_on_logits_and_stable():
    from vae_cli.likelihoods import Bernoulli

    px = Bernoulli()(torch.tensor([[[[80.0, -80.0]]]]))
    assert torch.isfinite(px.log_prob(torch.tensor([[[[0.0, 1.0]]]]))).all()
    assert torch.allclose(px.log_prob(torch.tensor([[[[1.0, 0.0]]]])), torch.zeros(1), atol=1e-6)


def test_bernoulli_log_prob_of_a_confident_decoder_cancels_nothing():
    """A decoder sure of most pixels (|logits| 20 to 100) and wrong about three: the image's log-density
    (-130 to -170 nats) is the sum of terms of 1e4 nats or more written as x l - softplus(l), which in
    float32 would cancel to a 2e-3 error. The sum is taken of non-negative terms instead: within two
    float32 roundings of the exact value."""
    from vae_cli.likelihoods import Bernoulli

    g = torch.Generator().manual_seed(0)
    logits = (20 + 80 * torch.rand(4, 1, 28, 28, generator=g)) * torch.randn(4, 1, 28, 28, generator=g).sign()
    x = (logits > 0).float()
    x.view(4, -1)[:, :3] = 1 - x.view(4, -1)[:, :3]                                     # three pixels wrong
    exact = (x.double() * logits.double() - torch.nn.functional.softplus(logits.double())).sum((1, 2, 3))
    ours = Bernoulli()(logits).log_prob(x)
    assert ours.dtype == torch.float32 and (exact < -100).all()
    assert torch.allclose(ours.double(), exact, rtol=2 * 2**-24, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_log_prob_equals_torch_and_its_gradient(dtype):
    """The fast log_prob (x l - softplus(l), one-expression backward) against torch's own Bernoulli
    (-BCE with logits): values and gradients, from tiny to huge logits, binary and grey x, and
    broadcast as IWAE uses it (k draws of logits against one x)."""
    from vae_cli.likelihoods import Bernoulli

    g = torch.Generator().manual_seed(0)
    logits = torch.cat([torch.tensor([-1e4, -100.0, -30.0, -17.0, -1e-6, 0.0, 1e-6, 17.0, 30.0, 100.0, 1e4]),
                        20 * torch.randn(5, generator=g)]).to(dtype)                   # (16,)
    logits = logits.view(1, 1, 4, 4).expand(3, 2, 1, 4, 4).clone().requires_grad_()  # (k=3, B=2, C, H, W)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=dtype)
    x[0] = x[0].round()                                                               # one binary image, one grey
    x.requires_grad_()
    ours = Bernoulli()(logits).log_prob(x)                                            # (3, 2)
    ref = torch.distributions.Independent(torch.distributions.Bernoulli(logits=logits, validate_args=False), 3,
                                          validate_args=False).log_prob(x)
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    assert ours.shape == (3, 2) and torch.allclose(ours, ref, rtol=0, atol=tol * 16)
    w = torch.randn(3, 2, generator=g, dtype=dtype)
    got = torch.autograd.grad((ours * w).sum(), (logits, x))
    want = torch.autograd.grad((ref * w).sum(), (logits, x))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=tol)
    small = (logits[:1, :1].detach().double().requires_grad_(), x[:1].detach().double().requires_grad_())
    assert torch.autograd.gradcheck(lambda l, v: Bernoulli()(l).log_prob(v), small)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_image_log_prob_sums_the_pixels_as_independent_does(likelihood):
    """ImageDistribution's one reduction over (C, H, W) against torch's Independent: values and
    gradients, for a batch and for k draws of a batch (as IWAE evaluates it)."""
    from torch.distributions import Independent

    from vae_cli.likelihoods import Bernoulli, ImageDistribution

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 2, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)  # (k, B, C, H, W)
    x = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    px = Bernoulli()(out) if likelihood == "bernoulli" else Gaussian([1, 4, 5])(out)
    assert isinstance(px, ImageDistribution) and px.event_shape == (1, 4, 5) and px.batch_shape == (3, 2)
    ref = Independent(px.base_dist, 3, validate_args=False)
    ours, want = px.log_prob(x), ref.log_prob(x)
    assert ours.shape == (3, 2) and torch.allclose(ours, want, rtol=0, atol=1e-12)
    (a,) = torch.autograd.grad(ours.sum(), out, retain_graph=True)  # the graph up to px's parameters is shared
    (b,) = torch.autograd.grad(want.sum(), out)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_diagonal_gaussian_is_torchs_normal_draws_and_gradients_included():
    """q(z|x)'s light Normal (no broadcast, rsample by addcmul) against torch's Normal: the same
    draws from the same seed, log-densities, mean, entropy, KL and reparameterised gradients; expand
    and a loc and scale of different shapes still work."""
    from torch.distributions import Independent, Normal, kl_divergence

    from vae_cli.posteriors import DiagonalNormal, diagonal_gaussian

    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    logvar = (4 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    q = diagonal_gaussian(mu, logvar)
    ref = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    assert isinstance(q.base_dist, DiagonalNormal) and q.batch_shape == (3,) and q.event_shape == (4,)
    torch.manual_seed(1)
    z = q.rsample((5,))                                                       # (5, 3, 4)
    torch.manual_seed(1)
    z_ref = ref.rsample((5,))
    assert z.shape == (5, 3, 4) and torch.allclose(z, z_ref, rtol=0, atol=1e-12)
    w = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((z * w).sum(), (mu, logvar))
    want = torch.autograd.grad((z_ref * w).sum(), (mu, logvar))
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, want))
    z = z.detach()
    assert torch.allclose(q.log_prob(z), ref.log_prob(z), rtol=0, atol=1e-12)
    assert torch.equal(q.mean, ref.mean) and torch.allclose(q.entropy(), ref.entropy())
    p = Independent(Normal(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)), 1)
    assert torch.allclose(kl_divergence(q, p), kl_divergence(ref, p))
    e = q.expand((2, 3))
    assert isinstance(e.base_dist, DiagonalNormal) and e.rsample().shape == (2, 3, 4)
    b = DiagonalNormal(torch.zeros(4), torch.ones(2, 1))                      # broadcast as torch's Normal does
    assert b.batch_shape == (2, 4) and b.rsample().shape == (2, 4)


def test_the_standard_prior_is_built_once_per_pair_of_buffers():
    """model.prior hands out one object while the buffers stay; a move (.double(), .to) gives a new
    one on the new buffers, never a stale one."""
    from vae_cli.model import VAE
    from vae_cli.networks import MLPDecoder, MLPEncoder
    from vae_cli.likelihoods import Bernoulli

    vae = VAE(3, MLPEncoder([1, 2, 2], 3, [5]), MLPDecoder([1, 2, 2], 3, [5]), Bernoulli())
    p = vae.prior
    assert vae.prior is p and p.base_dist.loc is vae.prior_loc and p.base_dist.scale is vae.prior_scale
    vae.double()
    q = vae.prior
    assert q is not p and q.base_dist.loc is vae.prior_loc and q.mean.dtype == torch.float64
    assert torch.allclose(q.log_prob(torch.zeros(3, dtype=torch.float64)),
                          torch.tensor(-1.5 * math.log(2 * math.pi), dtype=torch.float64))


def test_bernoulli_distribution_keeps_torchs_interface():
    """p(x|z) built without torch's checks still is torch's Bernoulli: probs, mean, sample, expand,
    entropy, and log_prob broadcast against x of another shape."""
    from torch.distributions import Bernoulli as TorchBernoulli

    from vae_cli.likelihoods import Bernoulli, BernoulliLogits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 2, 3, generator=g)
    px, ref = Bernoulli()(logits), TorchBernoulli(logits=logits, validate_args=False)
    assert isinstance(px.base_dist, BernoulliLogits) and px.batch_shape == (2,) and px.event_shape == (1, 2, 3)
    assert torch.allclose(px.base_dist.probs, ref.probs) and torch.allclose(px.mean, ref.mean)
    assert torch.allclose(px.base_dist.entropy(), ref.entropy())
    assert px.sample((4,)).shape == (4, 2, 1, 2, 3)
    e = px.expand((5, 2))
    assert isinstance(e.base_dist, BernoulliLogits) and e.batch_shape == (5, 2)
    x = torch.rand(1, 2, 3, generator=g)                                       # one image against two logits
    assert torch.allclose(px.log_prob(x), ref.log_prob(x).sum((-3, -2, -1)), atol=1e-5)


def test_kl_to_the_standard_normal_prior_is_torchs_closed_form():
    """model.prior dispatches KL(q || N(0, I)) to the registered short form: the values and
    gradients of torch's Normal-Normal KL, from tiny to huge scales."""
    from torch.distributions import Independent, Normal, kl_divergence

    from vae_cli.priors import StandardNormal, UnitNormal

    g = torch.Generator().manual_seed(0)
    mu = torch.cat([torch.tensor([0.0, 1e-6, -3.0, 40.0]), torch.randn(12, generator=g)]).view(4, 4)
    logvar = torch.cat([torch.tensor([-27.0, 27.0, 0.0, -1e-6]), 4 * torch.randn(12, generator=g)]).view(4, 4)
    mu, logvar = mu.double().requires_grad_(), logvar.double().requires_grad_()
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    model = type("M", (), {"prior_loc": torch.zeros(4, dtype=torch.float64),
                           "prior_scale": torch.ones(4, dtype=torch.float64)})()
    prior = StandardNormal().distribution(model)
    assert isinstance(prior.base_dist, UnitNormal)
    ours = kl_divergence(q, prior)                                                        # (4,)
    want = kl_divergence(q, Independent(Normal(torch.zeros(4, dtype=torch.float64),
                                               torch.ones(4, dtype=torch.float64)), 1))
    assert torch.allclose(ours, want, rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours, 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1), rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours.sum(), (mu, logvar), retain_graph=True)  # q's scale is shared
    ref = torch.autograd.grad(want.sum(), (mu, logvar))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_bernoulli_log_prob_of_half_precision_logits_is_computed_in_float32():
    """Under autocast (trainer.precision=bf16-mixed) the decoder gives bf16 logits: the value and
    gradient must match float32's, as torch's BCE (on autocast's float32 list) does."""
    from vae_cli.likelihoods import Bernoulli

    g = torch.Generator().manual_seed(0)
    logits = (8 * torch.randn(4, 1, 28, 28, generator=g)).to(torch.bfloat16).requires_grad_()
    x = (torch.rand(4, 1, 28, 28, generator=g) < 0.3).float()
    ours = Bernoulli()(logits).log_prob(x)
    exact = Bernoulli()(logits.detach().double()).log_prob(x.double())
    assert ours.dtype == torch.float32 and torch.allclose(ours.double(), exact, atol=1e-3)
    (grad,) = torch.autograd.grad(ours.sum(), logits)
    want = (x.double() - torch.sigmoid(logits.detach().double())).to(torch.bfloat16)
    assert torch.allclose(grad.float(), want.float(), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elu_equals_torch_and_its_gradient(dtype):
    """The ELU from exp against nn.ELU (expm1): values and gradients, near 0 and far from it."""
    from vae_cli.networks import ELU

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([-1e4, -100.0, -20.0, -1.0, -1e-4, -1e-8, 0.0, 1e-8, 1e-4, 1.0, 50.0]),
                   5 * torch.randn(300, generator=g)]).to(dtype).requires_grad_()
    ours, ref = ELU()(x), torch.nn.ELU()(x)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-7 if dtype == torch.float32 else 1e-15)
    w = torch.randn(x.shape, generator=g, dtype=dtype)
    (a,), (b,) = torch.autograd.grad((ours * w).sum(), x), torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(ELU(), (x[:20].detach().double().requires_grad_(),))


def test_atomic_checkpoint_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)
    good = target.read_bytes()

    def dies_half_way(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_fused_adam_gives_the_classic_adam_numbers(conf):
    """The fast path (fused Adam, the default) against torch's classic per-tensor loop: same losses."""
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = example_model(conf)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
        x = (torch.rand(256, 1, 28, 28) > 0.5).float()
        torch.manual_seed(1)
        out = []
        for i in range(20):
            recon, kl = model.elbo_terms(x[i % 2 * 128 : (i % 2 + 1) * 128])
            loss = -(recon - kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[fused] = torch.tensor(out)
    assert torch.allclose(losses[True], losses[False], rtol=1e-4)
