"""model=resnet: shapes, bounded log-variance, per-example independence, a real short training run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vae_cli.networks import LOGVAR_BOUND, ResNetDecoder, ResNetEncoder

from conftest import TINY, run_main


@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 32, 32]])
def test_resnet_shapes(shape):
    torch.manual_seed(0)
    enc = ResNetEncoder(shape, latent_dim=5, channels=[8, 16], blocks=2, hidden=32)
    dec = ResNetDecoder(shape, latent_dim=5, channels=[8, 16], blocks=2, hidden=32)
    mu, logvar = enc(torch.rand(4, *shape))
    assert mu.shape == logvar.shape == (4, 5)
    assert dec(mu).shape == (4, *shape)
    assert dec(torch.randn(3, 4, 5)).shape == (3, 4, *shape)       # z (..., D) -> (..., C, H, W)


def test_resnet_encoder_log_variance_is_bounded():
    torch.manual_seed(0)
    enc = ResNetEncoder([1, 28, 28], latent_dim=4, channels=[8, 16], blocks=1, hidden=32)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1).mul_(1000.0)                                # absurd weights, zero-initialised ones too
    mu, logvar = enc(torch.rand(8, 1, 28, 28))
    assert torch.isfinite(mu).all() and torch.isfinite(logvar).all()
    assert logvar.abs().max() <= LOGVAR_BOUND


def test_resnet_examples_are_independent_of_their_batch():
    """GroupNorm, not BatchNorm: an example's q(z|x) is the same alone or in a batch, in train mode too."""
    torch.manual_seed(0)
    enc = ResNetEncoder([3, 32, 32], latent_dim=4, channels=[8, 16], blocks=1, hidden=32).train()
    x = torch.rand(6, 3, 32, 32)
    mu, logvar = enc(x)
    mu0, logvar0 = enc(x[:1])
    assert torch.allclose(mu[:1], mu0, atol=1e-5) and torch.allclose(logvar[:1], logvar0, atol=1e-5)


def test_vae_train_model_resnet(data_dir, tmp_path):
    tiny = [o for o in TINY if not o.startswith("model.encoder.hidden=")]
    code = run_main("train", "model=resnet", f"data_dir={data_dir}", *tiny, "model.encoder.hidden=32",
                    "model.encoder.channels=[8,16]", "trainer.max_epochs=1",
                    "trainer.limit_train_batches=3", f"hydra.run.dir={tmp_path}")
    assert code == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 3
    assert all(math.isfinite(metrics[k]) for k in ("val_elbo", "test_elbo", "test_log_px"))
    assert run_main("sample", f"run={tmp_path}", "n=4", f"out={tmp_path / 'samples.png'}") == 0  # the checkpoint rebuilds
    assert (tmp_path / "samples.png").exists()
