"""A VAE with a hierarchy of stochastic layers (``model=ladder``), any number L >= 2 of layers:

    generative:  p(z_L) = N(0, I),  p(z_l | z_{l+1}) = N(mu, diag sigma^2) (l < L),  p(x | z_1)

(``prior=vamp``: p(z_L) the VampPrior, a mixture of ``top_posterior`` at learned pseudo-inputs)

and one of two inference models (``inference``), each layer a diagonal Gaussian:

* ``top_down``: the Ladder VAE of Sonderby, Raiko, Maaloe, Sonderby and Winther
  (2016, "Ladder Variational Autoencoders", NeurIPS, eqs. 17-21). A deterministic bottom-up pass
  d_1 = MLP(x), d_l = MLP(d_{l-1}) gives each layer (mu_hat_l, sigma_hat_l^2); then, top-down,
  q(z_L | x) = N(mu_hat_L, sigma_hat_L^2) and q(z_l | z_{l+1}, x) is the precision-weighted
  combination of (mu_hat_l, sigma_hat_l^2) with the generative p(z_l | z_{l+1}) (shared with the prior):
      sigma_q^2 = 1 / (1 / sigma_hat^2 + 1 / sigma_p^2),  mu_q = (mu_hat / sigma_hat^2 + mu_p / sigma_p^2) sigma_q^2.
* ``bottom_up`` (the default): the two-layer model of Burda, Grosse and Salakhutdinov (2016,
  section 5), q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}). It trained better than ``top_down`` in
  the same time on MNIST (README, Results).

z is the concatenation [z_1, ..., z_L], (..., D_1 + ... + D_L), so the model offers exactly the
interface of ``vae_cli.model.VAE`` (``posterior``, ``prior``, ``proposal``, ``log_joint``,
``decode``, ``elbo_terms``, ``encode``, ``latent_dim``, ``device``): objectives, estimators and
pictures use it unchanged. q(z|x) and p(z) are ``Chain`` distributions: ancestral sampling in their
own order, log_prob the sum of the layers' Gaussian log-densities. No KL in closed form: the KL of
the ELBO is the one-sample Monte Carlo estimate log q(z|x) - log p(z) at the same draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from vae_cli.errors import SettingsClash
from vae_cli.model import LatentModel
from vae_cli.networks import ELU, bounded_logvar
from vae_cli.posteriors import Posterior
from vae_cli.priors import Prior, StandardNormal
from vae_cli.typed import ImageShape, PosInt, PosInts

LatentDims = Annotated[list[PosInt], Field(min_length=2)]
# top_down: the Ladder VAE's precision-weighted inference (Sonderby et al. 2016); bottom_up: Burda et al. 2016
Inference = Literal["top_down", "bottom_up"]
# The hidden units of every conditional network. tanh is Burda et al.'s; with top_down inference it
# collapsed on MNIST: in the first 50 Adam steps, with the decoder still at the mean image, the KL
# lowers sigma_p and raises sigma_hat of the bottom layer, so x's weight in the precision-weighted q,
# sigma_q^2 / sigma_hat^2, falls from 0.5 to 0.03; mu_hat_1 then gets 3% of its gradient, and with tanh
# hidden units its spread over x stayed at 0.03 and the KL went to 0.1 nats for good. With ELU units
# mu_hat_1's spread grew to 0.5 within 400 steps, and the model trained (README, Results).
Activation = Literal["tanh", "elu"]
# A floor on log sigma^2 of the generative conditionals p(z_l | z_{l+1}), inside the soft bound:
# the top-down Ladder VAE drives sigma_p to ~0.002, which makes z_1 a function of z_2 and leaves
# x a weight of ~1e-8 in q(z_1 | z_2, x) (README, Results); a floor keeps noise in p.
LogvarFloor = Annotated[float, Field(gt=-14.0, lt=14.0)]

ACTIVATIONS = {"tanh": nn.Tanh, "elu": ELU}
# a conditional layer: its input (..., D_in) -> (mu, logvar) of the next layer, (..., D_out) each
Layer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def diagonal(mu: torch.Tensor, logvar: torch.Tensor) -> Distribution:
    """N(mu, diag exp(logvar)), event (D,)."""
    return Independent(Normal(mu, (0.5 * logvar).exp(), validate_args=False), 1, validate_args=False)


class Chain(Distribution):
    """A distribution over the concatenation of blocks [z_1, ..., z_L] (sizes ``dims``), drawn one
    block after another in the order ``order``: the first from ``first``, each next one from
    ``layers[i](previous block)``. log_prob is the sum of the blocks' log-densities.

    p(z): order L, ..., 1, ``first`` = N(0, I). q(z|x), bottom-up: order 1, 2, ..., L; top-down:
    order L, ..., 1, and each layer a ``PrecisionWeighted`` that also holds x's bottom-up statistics,
    (B, D_l), broadcast against the previous block's sample dimensions (k, B, D_{l+1}).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 1)

    def __init__(self, dims: Sequence[int], order: Sequence[int], first: Distribution, layers: Sequence[Layer]) -> None:
        assert len(order) == len(dims) == len(layers) + 1
        self.dims, self.order, self.first, self.layers = list(dims), list(order), first, list(layers)
        super().__init__(first.batch_shape, torch.Size([sum(dims)]), validate_args=False)

    @property
    def has_rsample(self) -> bool:
        """Reparameterised draws need every block's: a VampPrior at the top has none."""
        return self.first.has_rsample

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if not self.has_rsample:
            raise NotImplementedError(f"{type(self.first).__name__} at the top has no reparameterised draw")
        return self.rsample_and_log_prob(sample_shape)[0]

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample_and_log_prob(sample_shape)[0]

    def rsample_and_log_prob(self, sample_shape: torch.Size = torch.Size()) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw z (*sample_shape, *batch, D), reparameterised where ``has_rsample``, and its log_prob,
        from the same layer densities."""
        blocks: list[torch.Tensor | None] = [None] * len(self.dims)
        # a VampPrior at the top has no rsample: it is only ever sampled, never differentiated through
        z = self.first.rsample(sample_shape) if self.first.has_rsample else self.first.sample(sample_shape)
        log_p = self.first.log_prob(z)
        blocks[self.order[0]] = z
        for layer, i in zip(self.layers, self.order[1:]):
            d = diagonal(*layer(z))
            z = d.rsample()
            log_p = log_p + d.log_prob(z)
            blocks[i] = z
        return torch.cat(blocks, -1), log_p

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        return list(z.split(self.dims, -1))

    def layer_log_probs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The log-density of each block given the one before it in the order, (..., *batch) each."""
        blocks = self.split(z)
        out = [self.first.log_prob(blocks[self.order[0]])]
        for layer, prev, i in zip(self.layers, self.order[:-1], self.order[1:]):
            out.append(diagonal(*layer(blocks[prev])).log_prob(blocks[i]))
        return out

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return sum(self.layer_log_probs(z))

    def mean_path(self) -> torch.Tensor:
        """The block means in the order, each given the mean of the block before it, (*batch, D)."""
        blocks: list[torch.Tensor | None] = [None] * len(self.dims)
        z = self.first.mean                                          # (*batch, D_first)
        blocks[self.order[0]] = z
        for layer, i in zip(self.layers, self.order[1:]):
            z = layer(z)[0]                                          # (*batch, D_i)
            blocks[i] = z
        return torch.cat(blocks, -1)


def precision_weighted(mu_hat: torch.Tensor, logvar_hat: torch.Tensor, mu_p: torch.Tensor,
                       logvar_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The product of N(mu_hat, sigma_hat^2) and N(mu_p, sigma_p^2), normalised (Sonderby et al. 2016,
    eqs. 18-19): sigma_q^2 = 1 / (1 / sigma_hat^2 + 1 / sigma_p^2), mu_q = (mu_hat / sigma_hat^2 +
    mu_p / sigma_p^2) sigma_q^2, in log-variance space. Shapes broadcast: (B, D) with (k, B, D).

    Both inputs come from ``bounded_logvar``, and logvar_q lies in [min - log 2, min] of them, so it
    needs no clamp of its own (a second soft clamp would change the exact product).
    """
    logvar = -torch.logaddexp(-logvar_hat, -logvar_p)               # log sigma_q^2, (..., D)
    w = torch.sigmoid(logvar_p - logvar_hat)                         # sigma_q^2 / sigma_hat^2, (..., D)
    return w * mu_hat + (1 - w) * mu_p, logvar                       # sigma_q^2 / sigma_p^2 = 1 - w


class PrecisionWeighted:
    """A layer of the top-down q: z_{l+1} (..., B, D_{l+1}) -> (mu_q, logvar_q) of q(z_l | z_{l+1}, x),
    (..., B, D_l) each: the generative p(z_l | z_{l+1}) merged with x's bottom-up (mu_hat_l,
    logvar_hat_l), (B, D_l) each, computed once per x."""

    def __init__(self, generative: Layer, mu_hat: torch.Tensor, logvar_hat: torch.Tensor) -> None:
        self.generative, self.mu_hat, self.logvar_hat = generative, mu_hat, logvar_hat

    def __call__(self, z_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu_p, logvar_p = self.generative(z_above)                    # (..., B, D_l) each
        return precision_weighted(self.mu_hat, self.logvar_hat, mu_p, logvar_p)


class GaussianLayer(nn.Module):
    """A conditional diagonal Gaussian: input (..., D_in) (or an image, flattened) -> (mu, logvar), (..., D_out)."""

    def __init__(self, d_in: int, d_out: int, hidden: list[int], flatten: int = 0,
                 activation: Activation = "tanh", logvar_floor: float | None = None) -> None:
        super().__init__()
        self.flatten = flatten  # trailing dimensions of the input to flatten (3 for an image)
        self.logvar_floor = logvar_floor
        sizes = [d_in, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], 2 * d_out))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flatten:
            h = h.flatten(-self.flatten)
        mu, raw = self.net(h).chunk(2, dim=-1)
        logvar = bounded_logvar(raw)
        if self.logvar_floor is not None:  # a smooth floor: softplus keeps the gradient alive below it
            logvar = self.logvar_floor + nn.functional.softplus(logvar - self.logvar_floor)
        return mu, logvar


class BottomUpLayer(GaussianLayer):
    """A step of the top-down model's deterministic bottom-up pass (Sonderby et al. 2016):
    d_{l-1} (..., D_in) (or x, flattened) -> (d_l, mu_hat_l, logvar_hat_l): d_l the last tanh layer,
    (..., hidden[-1]), the input of the next step; mu_hat_l and logvar_hat_l, (..., D_out) each, its
    linear heads."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.flatten:
            h = h.flatten(-self.flatten)
        d = self.net[:-1](h)                                         # (..., hidden[-1])
        mu, raw = self.net[-1](d).chunk(2, dim=-1)                   # (..., D_out) each
        return d, mu, bounded_logvar(raw)


# The config group options (conf/posterior/*.yaml, conf/prior/*.yaml) of the classes they build, for messages.
_OPTIONS = {"IAFPosterior": "iaf", "GaussianPosterior": "gaussian", "StandardNormal": "standard", "VampPrior": "vamp"}


class LadderVAE(LatentModel):
    """A hierarchical VAE: ``latent_dims`` [D_1, ..., D_L] from the image side (z_1 next to x),
    ``hidden`` the deterministic layers of every conditional network, with ``activation`` units
    (tanh as Burda et al.; ELU for top_down, see ``Activation``), ``logvar_floor`` a floor on log
    sigma^2 of every p(z_l|z_{l+1}) (None: none; see ``LogvarFloor``), ``likelihood`` p(x|z_1) from the
    decoder's output (C, H, W), ``inference`` the inference model (the module docstring):
    ``top_down`` (Sonderby et al. 2016) or ``bottom_up`` (Burda et al. 2016).

    ``prior`` is p(z_L), the top of the hierarchy (conf/prior): N(0, I) by default, or the VampPrior
    (Tomczak and Welling 2018, section 3.2, as their two-layer HVAE: on the top layer only), a mixture
    of ``top_posterior`` at its pseudo-inputs. ``posterior`` (conf/posterior) must be the default:
    the hierarchy is q's family.
    """

    def __init__(self, image_shape: ImageShape, latent_dims: LatentDims, hidden: PosInts, likelihood: nn.Module,
                 prior: Prior | None = None, posterior: Posterior | None = None,
                 inference: Inference = "bottom_up", activation: Activation = "tanh",
                 logvar_floor: LogvarFloor | None = None) -> None:
        super().__init__()
        self.check_settings({"prior": prior, "posterior": posterior})
        # p(z_L)'s weights are saved as prior_module.* (none for N(0, I): old checkpoints load as before)
        self.prior_module = prior if prior is not None else StandardNormal()
        self.image_shape, self.latent_dims = tuple(image_shape), list(latent_dims)
        self.latent_dim = sum(latent_dims)
        self.inference = inference
        dims, pixels, act = self.latent_dims, math.prod(image_shape), activation
        if inference == "top_down":
            # the bottom-up pass x -> d_1 -> ... -> d_L, with (mu_hat_l, logvar_hat_l) from each d_l
            self.encoder = nn.ModuleList([BottomUpLayer(pixels, dims[0], hidden, flatten=3, activation=act)] +
                                         [BottomUpLayer(hidden[-1], b, hidden, activation=act) for b in dims[1:]])
        else:
            # q(z_1|x), q(z_2|z_1), ..., q(z_L|z_{L-1})
            self.encoder = nn.ModuleList([GaussianLayer(pixels, dims[0], hidden, flatten=3, activation=act)] +
                                         [GaussianLayer(a, b, hidden, activation=act) for a, b in zip(dims[:-1], dims[1:])])
        # p(z_{L-1}|z_L), ..., p(z_1|z_2): the generative top-down layers (also in top_down's q)
        self.top_down = nn.ModuleList([GaussianLayer(b, a, hidden, activation=act, logvar_floor=logvar_floor)
                                       for a, b in reversed(list(zip(dims[:-1], dims[1:])))])
        # p(x|z_1): z_1 -> hidden (from the image side, so reversed) -> (C, H, W)
        sizes = [dims[0], *reversed(hidden)]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[act]()]
        self.decoder = nn.Sequential(*layers, nn.Linear(sizes[-1], pixels), nn.Unflatten(-1, self.image_shape))
        self.likelihood = likelihood
        # N(0, I)'s parameters over z_L (not saved), as StandardNormal reads them; also the model's device
        self.register_buffer("prior_loc", torch.zeros(dims[-1]), persistent=False)
        self.register_buffer("prior_scale", torch.ones(dims[-1]), persistent=False)

    @staticmethod
    def check_settings(args: dict) -> None:
        """The default posterior family only (the hierarchy is q's family); p(z_L) standard or vamp."""
        for key, allowed in (("prior", ("StandardNormal", "VampPrior")), ("posterior", ("GaussianPosterior",))):
            value = args.get(key)
            name = value.get("_target_", "") if isinstance(value, dict) else type(value).__name__ if value is not None else ""
            name = name.rsplit(".", 1)[-1]
            if value is not None and name not in allowed:
                hint = ("it has its own hierarchical posterior; use the default posterior (posterior=gaussian)"
                        if key == "posterior" else "its top layer takes prior=standard or prior=vamp")
                # the group option the user chose (conf/posterior/iaf.yaml builds IAFPosterior), else the class
                raise SettingsClash(f"{key}={_OPTIONS.get(name, name)} is not allowed with model=ladder: {hint}")

    @property
    def device(self) -> torch.device:
        return self.prior_loc.device

    @property
    def standard_prior(self) -> bool:
        """p(z) is a hierarchy, not N(0, I) (pictures: no temperature, no KL per dimension)."""
        return False

    prior_description = "the hierarchy p(z_L) p(z_{L-1}|z_L) ... (model=ladder)"

    @property
    def prior(self) -> Chain:
        """p(z) over [z_1, ..., z_L], batch (), event (D,): ancestral sampling from z_L down, p(z_L)
        the configured prior (N(0, I), or the VampPrior over ``top_posterior``)."""
        top = self.prior_module.distribution(self)                    # batch (), event (D_L,)
        n = len(self.latent_dims)
        return Chain(self.latent_dims, list(range(n - 1, -1, -1)), top, list(self.top_down))

    def top_posterior(self, x: torch.Tensor) -> Distribution:
        """A diagonal Gaussian over the top latent z_L given x, batch (B,), event (D_L,): what the
        VampPrior mixes at its pseudo-inputs. top_down: q(z_L|x) itself. bottom_up: q(z_L|z_{L-1})
        along q's mean path from x (the marginal q(z_L|x) has no closed form; this is deterministic,
        so the prior stays an exact, normalised mixture of Gaussians)."""
        if self.inference == "top_down":
            return self.posterior(x).first                           # the bottom-up pass; no layer of q drawn
        mu, logvar = self.encoder[0](x)                              # (B, D_1) each
        for layer in self.encoder[1:]:
            mu, logvar = layer(mu)                                   # (B, D_l) each
        return diagonal(mu, logvar)

    def posterior(self, x: torch.Tensor) -> Chain:
        """q(z|x), batch (B,), event (D,): top_down q(z_L|x) q(z_{L-1}|z_L, x) ... q(z_1|z_2, x);
        bottom_up q(z_1|x) q(z_2|z_1) ... q(z_L|z_{L-1})."""
        n = len(self.latent_dims)
        if self.inference == "bottom_up":
            first = diagonal(*self.encoder[0](x))
            return Chain(self.latent_dims, list(range(n)), first, list(self.encoder[1:]))
        d, stats = x, []
        for layer in self.encoder:                                   # once per x, not per sample
            d, mu_hat, logvar_hat = layer(d)                         # (B, hidden[-1]), (B, D_l), (B, D_l)
            stats.append((mu_hat, logvar_hat))
        first = diagonal(*stats[-1])                                 # q(z_L|x), batch (B,)
        # self.top_down[j] is p(z_l|z_{l+1}) for l = L-1, ..., 1; stats[l-1] its (mu_hat_l, logvar_hat_l)
        layers = [PrecisionWeighted(p, *stats[l - 1]) for p, l in zip(self.top_down, range(n - 1, 0, -1))]
        return Chain(self.latent_dims, list(range(n - 1, -1, -1)), first, layers)

    def proposal(self, x: torch.Tensor) -> Chain:
        return self.posterior(x)

    def top_latent(self, z: torch.Tensor) -> torch.Tensor:
        """z_L, the top block of z = [z_1, ..., z_L]: (..., D) -> (..., D_L)."""
        return z[..., -self.latent_dims[-1]:]

    def from_top(self, z_top: torch.Tensor) -> torch.Tensor:
        """The z whose top block is z_top (..., D_L) and whose lower blocks are the means of
        p(z_l | z_{l+1}) in turn: what interpolating in the top latent walks (..., D)."""
        blocks = [z_top]
        for layer in self.top_down:                                  # p(z_{L-1}|z_L), ..., p(z_1|z_2)
            blocks.insert(0, layer(blocks[0])[0])                    # the mean, (..., D_l)
        return torch.cat(blocks, -1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """One code per input, (B, D): the mean of q's first layer, then of each next one given the
        mean before it (bottom_up: from z_1 up; top_down: from z_L down)."""
        return self.posterior(x).mean_path()

    def decode(self, z: torch.Tensor) -> Distribution:
        """p(x|z_1) from the concatenated z (..., D); event (C, H, W)."""
        return self.likelihood(self.decoder(z[..., : self.latent_dims[0]]))

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z_1) + log p(z_1|z_2) + ... + log p(z_L): z (..., B, D), x (B, C, H, W) -> (..., B)."""
        return self.decode(z).log_prob(x) + self.prior.log_prob(z)

    def elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (recon, kl), each (B,): kl = log q(z|x) - log p(z) at one reparameterised draw."""
        z, log_q = self.posterior(x).rsample_and_log_prob()
        return self.decode(z).log_prob(x), log_q - self.prior.log_prob(z)
