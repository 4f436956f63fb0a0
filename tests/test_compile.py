"""compile=true: the training objective through torch.compile (vae_cli.module.compile_terms).

Here torch's aot_eager backend stands in for inductor: it traces what inductor is given (dynamo's
graph of the objective, AOTAutograd's forward and backward) and runs the traced ops as they are,
drawing the same random numbers, so a compiled run must train like an op-by-op one. Inductor
itself (a C++ compiler, 15 to 50 s a model on a cold cache) is tested in test_slow.py."""

from __future__ import annotations

import json

import pytest
import torch

import vae_cli.module
from conftest import TINY, run_main
from test_graphs import EagerStepGraph, FailingStepGraph, weights

# 128 training images in batches of 48: two full batches (compiled) and one of 32 (op by op)
ARGS = [*TINY, "dataset.batch_size=48", "trainer.max_epochs=3", "eval.k=0"]


def trains_alike(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:  # the same ops in the same order; AOTAutograd may decompose a few of them
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["step"] == mb["step"] == 9 and ma["val_elbo"] == pytest.approx(mb["val_elbo"], rel=1e-4)


@pytest.mark.parametrize("extra", [[], ["kl_warmup_steps=4", "free_bits=0.1"]])
def test_a_compiled_run_trains_like_an_op_by_op_one(tmp_path, data_dir, traced, extra):
    assert run_main("train", f"data_dir={data_dir}", *ARGS, *extra, f"hydra.run.dir={tmp_path / 'plain'}") == 0
    assert traced.calls == []
    assert run_main("train", f"data_dir={data_dir}", *ARGS, *extra, "compile=true",
                    f"hydra.run.dir={tmp_path / 'compiled'}") == 0
    # 9 steps: the first op by op (it fills torch's KL table), the 32-image batches (3, 6, 9) too;
    # one graph for all the rest, the KL weight of a warm-up changing at every step included
    assert traced.calls == [48] * 5 and traced.graphs == 1
    trains_alike(tmp_path / "plain", tmp_path / "compiled")


LADDER = [o for o in ARGS if not o.startswith("model.")] + ["model=ladder", "model.latent_dims=[4,2]",
                                                            "model.hidden=[16]"]


@pytest.mark.parametrize("args, graphs", [(ARGS + ["objective=iwae", "objective.dreg=true", "objective.start=0.4"], 2),
                                          (LADDER, 1)])
def test_other_objectives_and_models_compile(tmp_path, data_dir, traced, args, graphs):
    """The IWAE bound with DReG's gradient hook, after the ELBO for 40% of the run (a graph for each
    objective), and a two-layer hierarchy."""
    assert run_main("train", f"data_dir={data_dir}", *args, f"hydra.run.dir={tmp_path / 'plain'}") == 0
    assert run_main("train", f"data_dir={data_dir}", *args, "compile=true",
                    f"hydra.run.dir={tmp_path / 'compiled'}") == 0
    assert traced.calls and set(traced.calls) == {48} and traced.graphs == graphs
    trains_alike(tmp_path / "plain", tmp_path / "compiled")


def test_a_step_that_cannot_be_compiled_runs_op_by_op(tmp_path, data_dir, monkeypatch, capsys):
    """Inductor needs a C++ compiler: without one, one line and the run goes on op by op."""
    def no_compiler(terms):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")
        return call

    monkeypatch.setattr(vae_cli.module, "compile_terms", no_compiler)
    assert run_main("train", f"data_dir={data_dir}", *ARGS, f"hydra.run.dir={tmp_path / 'plain'}") == 0
    capsys.readouterr()
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "compile=true", f"hydra.run.dir={tmp_path / 'r'}") == 0
    err = capsys.readouterr().err
    assert err.count("could not be compiled (RuntimeError: InvalidCxxCompiler: No working C++ compiler") == 1, err
    assert "Traceback" not in err
    plain, compiled = weights(tmp_path / "plain"), weights(tmp_path / "r")
    assert all(torch.equal(plain[k], compiled[k]) for k in plain)  # every step op by op, as without compile


def test_a_backward_that_cannot_be_compiled_runs_op_by_op(tmp_path, data_dir, monkeypatch, capsys):
    """torch.compile compiles the backward at the first backward pass, in Lightning's loop: a
    failure there is also one line, then op by op (it was a traceback)."""
    from torch._dynamo.backends.common import aot_autograd

    def no_backward(gm, inputs):
        raise RuntimeError("backward lowering failed")

    backend = aot_autograd(fw_compiler=lambda gm, inputs: gm.forward, bw_compiler=no_backward)
    monkeypatch.setattr(vae_cli.module, "compile_terms", lambda terms: torch.compile(terms, backend=backend,
                                                                                      dynamic=False))
    torch._dynamo.reset()
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "compile=true", f"hydra.run.dir={tmp_path / 'r'}") == 0
    err = capsys.readouterr().err
    assert err.count("could not be compiled (RuntimeError: backward lowering failed)") == 1, err
    assert "Traceback" not in err, err
    torch._dynamo.reset()


def test_a_split_smaller_than_a_batch_is_compiled(tmp_path, data_dir, traced):
    """128 training images in batches of 256: one batch of 128 an epoch, the one shape there is."""
    args = [o for o in ARGS if not o.startswith("dataset.batch_size")] + ["dataset.batch_size=256"]
    assert run_main("train", f"data_dir={data_dir}", *args, "compile=true", f"hydra.run.dir={tmp_path / 'r'}") == 0
    assert traced.calls == [128, 128]  # epochs 2 and 3; the first step op by op


def test_a_fault_after_compiling_is_not_hidden(tmp_path, data_dir, monkeypatch, traced, capsys):
    """Once the compiled step has run, an error in it is the run's error, not a reason to go op by op."""
    calls = []

    def failing_later(terms):
        compiled = traced(terms)

        def call(*args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a fault of this step")
            return compiled(*args)
        return call

    monkeypatch.setattr(vae_cli.module, "compile_terms", failing_later)
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "compile=true", f"hydra.run.dir={tmp_path / 'r'}") != 0
    err = capsys.readouterr().err
    assert "RuntimeError: a fault of this step" in err and "could not be compiled" not in err


def test_a_cuda_graph_takes_the_step_and_compile_the_rest(tmp_path, data_dir, monkeypatch, traced):
    """On one GPU the graph replays the whole step (faster than compiled kernels launched one by one):
    compile=true then compiles nothing, unless the capture fails. The graph's stand-ins run on a CPU."""
    monkeypatch.setattr(vae_cli.module, "graph_blocker", lambda *a, **k: None)
    monkeypatch.setattr(vae_cli.module, "StepGraph", EagerStepGraph)
    EagerStepGraph.calls = 0
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "compile=true", f"hydra.run.dir={tmp_path / 'g'}") == 0
    assert EagerStepGraph.calls == 5 and traced.calls == []
    assert "compile=true: the training step runs as one CUDA graph instead" in (tmp_path / "g" / "train.log").read_text()
    monkeypatch.setattr(vae_cli.module, "StepGraph", FailingStepGraph)
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "compile=true", f"hydra.run.dir={tmp_path / 'f'}") == 0
    assert traced.calls == [48] * 4  # step 2 tried the capture and ran op by op; then 4 of the 5 full batches
