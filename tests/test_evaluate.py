"""`vae evaluate`'s estimators together: exact answers on linear-Gaussian models, the headline, the JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from conftest import run_main
from linear_gaussian import data, exact_log_px, make
from vae_cli.errors import UserError
from vae_cli.estimators import curve_ks
from vae_cli.evaluate import AIS, Exact, Plan, Refined, _batch_estimates, gaussian_q, resolve_estimators, summarize, table


def _evaluate(model, x, plan: Plan) -> dict:
    """What evaluate_split does, on continuous x (the linear-Gaussian model has no pixels)."""
    ks = curve_ks(plan.k)
    parts = _batch_estimates(model, x, 0, len(x), plan, 8192, ks)
    return summarize(parts, plan, ks, x[0].numel(), "none")


def test_every_estimator_on_a_2d_linear_gaussian_model():
    """Exact quadrature to 1e-6; refined IS and AIS within Monte Carlo error; exact is the headline."""
    torch.manual_seed(0)
    model, W, b, s = make(dz=2, shrink=0.6, inflate=3.0)
    x = data(model, 40)
    truth = exact_log_px(x, W, b, s)
    plan = Plan(k=500, estimators=resolve_estimators("auto", 2), refined=Refined(limit=40, steps=150),
                ais=AIS(limit=20, steps=100, chains=8))
    assert plan.estimators == ("iwae", "refined", "ais", "exact")
    parts = _batch_estimates(model, x, 0, len(x), plan, 8192, curve_ks(plan.k))
    assert torch.allclose(parts["exact"], truth, atol=1e-6, rtol=0)
    assert (parts["refined"] - truth).abs().max() < 0.02
    assert len(parts["ais"]) == 20 and abs((parts["ais"] - truth[:20]).mean()) < 0.02
    r = summarize(parts, plan, curve_ks(plan.k), 6, "none")
    est = r["estimators"]
    assert r["log_px_estimator"] == "exact" and r["log_px_n"] == 40
    assert abs(r["log_px"] - truth.mean().item()) < 1e-6
    assert r["log_px_sampling_estimator"] in ("refined", "ais", "iwae")
    assert abs(r["gap"] - (truth - parts["elbo"]).mean().item()) < 1e-9        # the gap rests on the headline
    assert est["ais"]["n"] == 20 and est["refined"]["n"] == 40 and est["iwae"]["n"] == 40
    # Cremer et al.: ELBO(q) <= ELBO(q*) <= log p(x); q* is the exact posterior here, so the
    # approximation gap vanishes and the amortization gap is the whole gap
    assert est["refined"]["amortization_gap"] > 1.0 and abs(est["refined"]["approximation_gap"]) < 0.02
    assert r["comparison"]["n"] == 20 and set(r["comparison"]["log_px"]) == {"iwae", "refined", "ais", "exact"}
    json.dumps(r)                                                                  # plain JSON types only


def test_the_gap_splits_on_the_headlines_own_examples_so_its_parts_add_up():
    """Each estimator covers its own first examples (here refined 30, AIS 20, exact 10): the split was
    taken on 30 and 10 and added up to 14.5 against a printed gap of 12.7 (a review's figures)."""
    torch.manual_seed(0)
    model, *_ = make(dz=2, shrink=0.6, inflate=3.0)
    x = data(model, 40)
    plan = Plan(k=64, estimators=("iwae", "refined", "ais", "exact"), refined=Refined(limit=30, steps=30),
                ais=AIS(limit=20, steps=20, chains=2), exact=Exact(limit=10))
    parts = _batch_estimates(model, x, 0, len(x), plan, 8192, curve_ks(plan.k))
    r = summarize(parts, plan, curve_ks(plan.k), 6, "none")
    e = r["estimators"]["refined"]
    assert r["log_px_n"] == 10 and e["gap_split_n"] == 10 and e["n"] == 30
    assert e["amortization_gap"] + e["approximation_gap"] == pytest.approx(r["gap"], abs=1e-9)
    assert e["amortization_gap"] == pytest.approx((parts["refined_elbo"][:10] - parts["elbo"][:10]).mean().item())
    line = next(ln for ln in table(r).splitlines() if "amortization gap" in ln)
    assert line.startswith(f"  gap on the first 10 examples {r['gap']:.3f} = amortization gap ELBO(q*) - ELBO(q) ")
    # a gap below 0 is noise, not a KL
    below = next(ln for ln in table({**r, "gap": -0.2}).splitlines() if ln.startswith("gap ="))
    assert "below 0, which the KL(q(z|x) || p(z|x)) it estimates cannot be" in below and below.endswith("raise k")
    # a q that is not one diagonal Gaussian (a flow, a ladder): the split is not called amortization
    other = table(summarize(parts, plan, curve_ks(plan.k), 6, "none", gaussian_q=False))
    assert "amortization gap ELBO" not in other and "(q* Gaussian, q not: not the amortization gap)" in other


def test_only_a_diagonal_gaussian_q_is_in_the_refined_proposals_family(conf):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    def q_of(*overrides: str) -> bool:
        with initialize_config_dir(config_dir=conf, version_base=None):
            cfg = compose("train", list(overrides))
        return gaussian_q(instantiate(cfg.model))

    assert q_of() and not q_of("posterior=iaf") and not q_of("model=ladder", "model.latent_dims=[4,2]")


def test_the_headline_is_the_best_sampling_estimate_without_quadrature():
    torch.manual_seed(0)
    model, W, b, s = make(shrink=0.6, inflate=3.0)                   # 3-d latent: no quadrature
    x = data(model, 30)
    plan = Plan(k=50, estimators=resolve_estimators("auto", 3), refined=Refined(steps=150), ais=AIS(steps=100))
    r = _evaluate(model, x, plan)
    assert "exact" not in r["estimators"]
    means = {n: e["log_px"] for n, e in r["estimators"].items()}
    assert r["log_px_estimator"] == max(means, key=means.get) != "iwae"     # IWAE with k=50 is the weakest
    assert abs(r["log_px"] - exact_log_px(x, W, b, s).mean().item()) < 0.05
    assert r["estimators"]["iwae"]["khat_bad_share"] >= 0 and r["estimators"]["iwae"]["ess_min"] >= 1
    assert r["estimators"]["iwae"]["curve"]["k"] == [1, 10, 50]


def test_a_poor_proposal_is_warned_about_and_a_good_one_is_not():
    torch.manual_seed(0)
    good, *_ = make()
    x = data(good, 30)
    assert _evaluate(good, x, Plan(k=200, estimators=("iwae",)))["warnings"] == []
    poor, *_ = make(shrink=0.0, inflate=0.05)       # q far too narrow and in the wrong place
    r = _evaluate(poor, data(poor, 30), Plan(k=200, estimators=("iwae",)))
    assert r["estimators"]["iwae"]["khat_bad_share"] > 0.5
    assert len(r["warnings"]) == 1 and "estimators=[refined,ais]" in r["warnings"][0]


def test_quadrature_is_refused_above_two_latent_dimensions():
    with pytest.raises(UserError, match="latent_dim=3"):
        resolve_estimators(["exact"], 3)
    assert "exact" not in resolve_estimators("auto", 3)
    assert resolve_estimators("ais", 20) == ("iwae", "ais")


def test_vae_evaluate_writes_json_and_curve_plot(trained_run_2d, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert run_main("evaluate", f"run={trained_run_2d}", "k=64", "limit=12", f"out={out}", "refined.steps=20",
                    "ais.steps=20", "ais.chains=2") == 0
    printed = capsys.readouterr().out
    assert "log p(x) =" in printed and "exact (quadrature)" in printed and "IWAE over k" in printed
    r = json.loads(out.read_text())
    assert set(r["estimators"]) == {"iwae", "refined", "ais", "exact"} and r["log_px_estimator"] == "exact"
    for name in ("iwae", "refined", "ais", "exact"):
        e = r["estimators"][name]
        assert e["n"] == 12 and math.isfinite(e["log_px"]) and e["log_px_se"] >= 0
    png = out.with_suffix(".png")
    with Image.open(png) as im:
        assert im.size == (600, 400)
    # a sampling estimate never sits far above the exact value (they are lower bounds)
    assert r["log_px_sampling"] <= r["log_px"] + 3 * r["log_px_sampling_se"] + 0.05


def test_vae_evaluate_bdmc_brackets_log_px_on_simulated_data_and_shows_its_progress(trained_run_2d, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert run_main("evaluate", f"run={trained_run_2d}", "k=32", "limit=4", f"out={out}", "estimators=[bdmc]",
                    "bdmc.n=6", "bdmc.steps=30", "bdmc.leapfrog=2", "bdmc.chains=3") == 0
    captured = capsys.readouterr()
    assert "BDMC on 6 simulated examples" in captured.out
    # BDMC's own passes show their progress, as the estimators on the data do (it ran silent before)
    assert "bdmc steps=30 (simulated data)" in captured.err and "6/6" in captured.err
    assert "iwae k=32 (simulated data)" in captured.err
    b = json.loads(out.read_text())["bdmc"]
    assert b["n"] == 6 and b["steps"] == 30 and b["width"] == pytest.approx(b["upper"] - b["lower"])
    # forward AIS is a lower bound, reverse AIS an upper one: they bracket log p(x) up to their noise
    assert b["lower"] <= b["upper"] + 3 * (b["lower_se"] + b["upper_se"]) + 0.1
    assert b["iwae"] <= b["upper"] + 3 * (b["iwae_se"] + b["upper_se"]) + 0.1


@pytest.mark.parametrize("args,message", [
    (["estimators=[exact]"], "quadrature needs latent_dim <= 2"),
    (["estimators=[iwae,magic]"], "estimators="),
    (["ais.steps=0"], "ais.steps=0 is not allowed"),
    (["ais.chains=-2"], "ais.chains=-2 is not allowed"),
    (["refined.lr=inf"], "refined.lr=inf is not allowed"),
    (["exact.tol=0"], "exact.tol=0 is not allowed"),
    (["refined.stepz=3"], "unknown setting 'refined.stepz'"),
    (["chunk=0"], "chunk=0 is not allowed: expected one of auto or an integer > 0"),
    # 50 "distinct" starts from 2 prior draws was accepted; restarts=10^9 sat at 0% until killed
    (["refined.restarts=50", "refined.search=2"], "vae: error: refined.restarts=50 is not allowed with "
     "refined.search=2: the restarts are picked from the search's prior draws; raise refined.search or lower "
     "refined.restarts"),
    (["refined.restarts=1000000000"], "refined.restarts=1000000000 is not allowed with refined.search=1024"),
])
def test_estimator_mistakes_are_one_line_and_write_nothing(trained_run, args, message, capsys):
    before = sorted((trained_run / "eval").glob("*")) if (trained_run / "eval").exists() else []
    assert run_main("evaluate", f"run={trained_run}", "k=4", "limit=4", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    after = sorted((trained_run / "eval").glob("*")) if (trained_run / "eval").exists() else []
    assert before == after


def test_ais_leaves_a_poor_q_star_and_an_unconverged_estimate_is_warned_about(monkeypatch):
    """A q* worse than q(z|x) by the ELBO (a diagonal q* on a hierarchy) is no start for AIS; and an
    estimate far below IWAE on the same examples is named, never the headline."""
    import vae_cli.evaluate as ev
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    torch.manual_seed(0)
    model, W, b, s = make(dz=2)
    x = data(model, 20)

    def far_off_refine(log_joint, q, prior, **kwargs):       # q* centred far from every posterior
        loc = torch.full((len(x), 1, 2), 30.0, dtype=torch.float64)
        q_star = MixtureSameFamily(Categorical(logits=torch.zeros(len(x), 1, dtype=torch.float64)),
                                   Independent(Normal(loc, torch.ones_like(loc) * 0.1), 1))
        return q_star, torch.full((len(x),), -1e4, dtype=torch.float64)

    monkeypatch.setattr(ev, "refine", far_off_refine)
    plan = Plan(k=200, estimators=("iwae", "refined", "ais"), refined=Refined(limit=20), ais=AIS(limit=20, steps=50))
    r = _evaluate(model, x, plan)
    truth = exact_log_px(x, W, b, s).mean().item()
    assert r["estimators"]["ais"]["init"] == "encoder" and abs(r["estimators"]["ais"]["log_px"] - truth) < 0.3
    assert r["log_px_estimator"] != "refined"
    assert any(w.startswith("refined") and "below IWAE" in w for w in r["warnings"]), r["warnings"]
    assert not any(w.startswith("AIS") for w in r["warnings"])


def test_chunk_auto_decodes_512_pairs_at_once_on_a_cpu(monkeypatch):
    """chunk=auto (the default): 512 (example, sample) pairs a chunk on a CPU, 8192 on a GPU; a
    chunk that is set is used as it is."""
    import vae_cli.evaluate as ev

    assert ev.default_rows(torch.device("cpu")) == 512 and ev.default_rows(torch.device("cuda", 0)) == 8192
    seen = []
    real = ev.estimate
    monkeypatch.setattr(ev, "estimate", lambda model, x, k, rows: seen.append(rows) or real(model, x, k, rows))
    from vae_cli.likelihoods import Bernoulli
    from vae_cli.model import VAE
    from vae_cli.networks import MLPDecoder, MLPEncoder

    torch.manual_seed(0)
    model = VAE(2, MLPEncoder([1, 4, 4], 2, [8]), MLPDecoder([1, 4, 4], 2, [8]), Bernoulli())  # on the CPU
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    plan = ev.Plan(k=4, estimators=("iwae",))
    ev.evaluate_split(model, images, "dynamic", plan, batch_size=3)
    ev.evaluate_split(model, images, "dynamic", plan, batch_size=3, rows=12)
    assert seen == [512, 512, 12, 12]


def test_the_default_restarts_never_outnumber_the_search_draws():
    """restarts=null means 4 for a latent space of at most 2 dimensions, else 0: never more than search."""
    from vae_cli.evaluate import _restarts

    assert _restarts(Refined(), 2) == 4 and _restarts(Refined(), 3) == 0 and _restarts(Refined(search=2), 2) == 2
    assert _restarts(Refined(restarts=3, search=3), 20) == 3 and _restarts(Refined(restarts=0), 1) == 0


def test_a_refined_optimisation_that_diverges_is_warned_about_not_a_traceback():
    """refined.lr=1e12: q* falls back to finite Gaussians; the JSON counts the examples, one warning line names lr."""
    torch.manual_seed(0)
    model, W, b, s = make(dz=2, shrink=0.6, inflate=3.0)
    x = data(model, 6)
    plan = Plan(k=64, estimators=("iwae", "refined"), refined=Refined(limit=6, steps=10, lr=1e12))
    r = _evaluate(model, x, plan)
    e = r["estimators"]["refined"]
    assert e["diverged"] == 6 and math.isfinite(e["log_px"]) and math.isfinite(e["elbo_refined"])
    assert e["log_px"] <= exact_log_px(x, W, b, s).mean().item() + 0.05
    assert ("refined q*: its optimisation went to NaN or infinity on 6 of 6 examples (refined.lr=1e12 is too large "
            "for them); q* there is the best finite Gaussian it passed through (at worst where it started, q(z|x)): "
            "lower refined.lr") in r["warnings"]
    json.dumps(r)
    calm = _evaluate(model, x, Plan(k=64, estimators=("iwae", "refined"), refined=Refined(limit=6, steps=10)))
    assert calm["estimators"]["refined"]["diverged"] == 0 and not any("refined q*" in w for w in calm["warnings"])


@pytest.mark.parametrize("args,message", [
    (["estimators=iwae", "k=3000000000"], "vae: error: k=3000000000 with batches of 4 examples needs about 1920.0 GB "
     "for its log weights, more than the "),
    (["estimators=ais", "ais.chains=1000000000"], "vae: error: ais.chains=1000000000 with batches of 4 examples "
     "decodes 4000000000 images at once, about 50176.0 GB, more than the "),
    (["estimators=refined", "refined.samples=1000000000"], "vae: error: refined.samples=1000000000 with batches of 4 "
     "examples decodes 4000000000 images at once"),
    (["estimators=refined", "refined.restarts=2", "refined.search=1000000000"], "vae: error: refined.search=1000000000 "
     "with batches of 4 examples decodes 4000000000 images at once"),
    (["estimators=bdmc", "bdmc.chains=1000000000"], "vae: error: bdmc.chains=1000000000 with batches of 100 simulated "
     "examples decodes 100000000000 images at once"),
    (["estimators=iwae", "k=1000000", "chunk=1000000000"], "vae: error: chunk=1000000000 with k=1000000 decodes "
     "4000000 images at once"),
])
def test_a_size_too_large_is_refused_in_its_one_line_before_the_banner(trained_run, args, message, capsys):
    """k=3000000000 printed the banner `vae evaluate: test split, 5 examples, ...` and then the refusal;
    ais.chains, refined.samples/search and bdmc.chains ran out of memory after a progress bar. Every
    size is now weighed before anything is printed or claimed: one line, nothing written."""
    before = sorted((trained_run / "eval").glob("*")) if (trained_run / "eval").exists() else []
    assert run_main("evaluate", f"run={trained_run}", "limit=4", *args) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    after = sorted((trained_run / "eval").glob("*")) if (trained_run / "eval").exists() else []
    assert before == after


def test_the_chunk_refusal_names_auto_as_given(trained_run, monkeypatch, capsys):
    """chunk left at auto: the line says so (it named chunk=512, a value the user never gave)."""
    from vae_cli import errors

    monkeypatch.setattr(errors, "available_memory", lambda device=None: 10**6)
    assert run_main("evaluate", f"run={trained_run}", "limit=2", "estimators=iwae", "k=100") == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("vae: error: chunk=auto (") and " here) with k=100 decodes " in line, line


def test_the_k_hat_advice_names_what_did_not_run_or_did_not_converge():
    """With refined and AIS run and no higher than IWAE, the warning told the user to run them."""
    from vae_cli.evaluate import warnings_for

    def result(*ran: str) -> dict:
        est = {"iwae": {"khat_bad_share": 0.9, "log_px": -90.0}, **{n: {"log_px": -91.0} for n in ran}}
        return {"estimators": est, "log_px_estimator": "iwae",
                "comparison": {"n": 4, "log_px": {n: est[n]["log_px"] for n in est}}}

    assert "run estimators=[refined,ais]" in warnings_for(result())[0]
    line = warnings_for(result("refined", "ais"))[0]
    assert "run estimators" not in line and "raise refined.steps and ais.steps" in line, line
    assert "raise ais.steps" in warnings_for(result("ais"))[0]
