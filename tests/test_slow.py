"""Full-size checks on real MNIST (fetched once into the cache). CI skips them: pytest -m slow runs them."""

from __future__ import annotations

import json

import pytest

from conftest import vae

pytestmark = pytest.mark.slow


def test_pytorch_example_reproduces_the_reference_test_loss(tmp_path):
    """pytorch/examples vae/main.py reaches a test loss of 105.5 nats after 10 epochs; so must we."""
    run = tmp_path / "example"
    r = vae("train", "experiment=pytorch_example", "eval.k=0", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epoch"] == 10
    assert abs(metrics["val_elbo"] - (-105.5)) < 1.0, metrics   # validation here is the 10k test set


def test_the_compiled_pytorch_example_reproduces_the_reference_test_loss(tmp_path):
    """compile=true with torch's real inductor backend: the same model, trained as well."""
    run = tmp_path / "example"
    cache = tmp_path / "inductor"  # torch's own: what it compiled lands there
    r = vae("train", "experiment=pytorch_example", "compile=true", "eval.k=0", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}", cwd=tmp_path, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "could not be compiled" not in r.stderr and "recompile_limit" not in r.stderr, r.stderr[-3000:]
    assert any(cache.rglob("*.so")), "nothing was compiled"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epoch"] == 10 and abs(metrics["val_elbo"] - (-105.5)) < 1.0, metrics


@pytest.mark.parametrize("option", ["model=conv", "model=resnet", "model=ladder", "prior=vamp", "posterior=iaf",
                                    "objective=iwae objective.dreg=true objective.start=0.5",
                                    "likelihood=gaussian kl_warmup_steps=3 free_bits=0.1"])
def test_every_option_compiles_with_inductor(tmp_path, data_dir, option):
    """Each model, prior, posterior and objective through torch's inductor on a CPU (tests/test_compile.py
    checks the tracing on every commit with a backend that compiles nothing)."""
    from conftest import TINY

    tiny = [o for o in TINY if not o.startswith("model.")]
    r = vae("train", f"data_dir={data_dir}", *tiny, *option.split(), "compile=true", "eval.k=4",
            f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path,
            env={"TORCH_LOGS": "recompiles,graph_breaks", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert any((tmp_path / "inductor").rglob("*.so")), "nothing was compiled"
    assert r.returncode == 0 and "could not be compiled" not in r.stderr, r.stderr[-3000:]
    if option != "posterior=iaf":  # zuko builds its transforms in ways torch.compile splits the graph at
        assert "Graph break" not in r.stderr, r.stderr[-3000:]
    assert "Recompiling" not in r.stderr and "recompile_limit" not in r.stderr, r.stderr[-3000:]


def test_mnist_has_the_classic_split():
    from vae_cli.data import load_splits

    splits = load_splits("mnist", "~/.cache/vae-cli")
    assert {k: tuple(v.shape) for k, v in splits.items()} == {
        "train": (50000, 1, 28, 28), "val": (10000, 1, 28, 28), "test": (10000, 1, 28, 28)}
    assert abs(splits["test"].float().mean().item() / 255 - 0.1325) < 0.002   # MNIST's mean intensity


@pytest.mark.parametrize("likelihood,args,tolerance", [
    ("gaussian", ["likelihood=gaussian"], 1.0),
    ("bernoulli", ["dataset.binarize=static"], 0.1),
])
def test_best_sampling_estimate_is_close_to_exact_quadrature_on_a_2d_model(tmp_path, likelihood, args, tolerance):
    """Issue 9's check: a 2-d mlp, 2 epochs of 100 batches; mean over the first 200 test images."""
    run = tmp_path / likelihood
    r = vae("train", "model.latent_dim=2", "trainer.max_epochs=2", "trainer.limit_train_batches=100", *args,
            "eval.k=0", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / f"{likelihood}.json"
    r = vae("evaluate", f"run={run}", "limit=200", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    e = json.loads(out.read_text())
    exact = e["estimators"]["exact"]
    assert exact["n"] == 200 and exact["converged_share"] == 1.0
    assert e["log_px_estimator"] == "exact" and e["log_px_sampling_n"] == 200
    assert abs(e["log_px_sampling"] - exact["log_px"]) < tolerance, e["comparison"]


def test_the_top_down_ladder_learns_on_mnist(tmp_path):
    """With tanh units the top-down ladder collapsed within its first 300 steps (val ELBO -205.6,
    the marginal of the pixels); with the default ELU units it learns (README, Results)."""
    run = tmp_path / "ladder"
    r = vae("train", "model=ladder", "model.inference=top_down", "trainer.max_epochs=3",
            "trainer.limit_train_batches=300", "eval.k=0", "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_elbo"] > -180, metrics
    assert "posterior collapse:" not in (run / "train.log").read_text()
