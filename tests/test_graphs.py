"""The training step as one CUDA graph (vae_cli.graphs): when it applies, and the module's hooks
around it. A CPU cannot capture, so here a stand-in runs what the graph would record (forward,
backward, update) op by op: the same numbers as Lightning's own step prove that the hooks neither
skip nor repeat anything. The capture itself is tested in test_gpu.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import vae_cli.module
from conftest import TINY, run_main
from vae_cli.graphs import StepGraph, graph_blocker


class EagerStepGraph(StepGraph):
    """What StepGraph records, run op by op at each call (counted)."""

    calls = captures = 0

    def capture(self, x: torch.Tensor) -> None:
        self.x, self.graph = x.clone(), "recorded"
        EagerStepGraph.captures += 1

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.x is None:
            self.capture(x)
        EagerStepGraph.calls += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss, *outputs = self.forward(x)
        loss.backward()
        self.optimizer.step()
        return (loss.detach(), *(o.detach() for o in outputs))


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# 128 training images in batches of 48: two full batches (replayed) and one of 32 (op by op)
ARGS = [*TINY, "dataset.batch_size=48", "trainer.max_epochs=3", "eval.k=0"]


@pytest.mark.parametrize("extra", [[], ["kl_warmup_steps=4"]])
def test_the_graphed_step_trains_exactly_like_lightnings_step(tmp_path, data_dir, monkeypatch, extra):
    assert run_main("train", f"data_dir={data_dir}", *ARGS, *extra, f"hydra.run.dir={tmp_path / 'plain'}") == 0
    monkeypatch.setattr(vae_cli.module, "graph_blocker", lambda *a, **k: None)
    monkeypatch.setattr(vae_cli.module, "StepGraph", EagerStepGraph)
    EagerStepGraph.calls = EagerStepGraph.captures = 0
    assert run_main("train", f"data_dir={data_dir}", *ARGS, *extra, f"hydra.run.dir={tmp_path / 'graph'}") == 0
    # 9 steps: step 1 (Adam's state) and the warm-up's steps (weight still rising) op by op, the
    # 32-image batches (steps 3, 6, 9) op by op, the rest replayed
    eager = {1, 3, 6, 9} | set(range(1, 5) if extra else ())
    assert EagerStepGraph.captures == 1 and EagerStepGraph.calls == 9 - len(eager)
    plain, graph = weights(tmp_path / "plain"), weights(tmp_path / "graph")
    assert plain.keys() == graph.keys()
    for name in plain:
        assert torch.equal(plain[name], graph[name]), name
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("plain", "graph")]
    assert metrics[0] == metrics[1] and metrics[0]["step"] == 9
    step = 5 if extra else 2  # the first step past the warm-up that is not an epoch's last batch
    assert f"captured as one CUDA graph at step {step} (batches of 48)" in (tmp_path / "graph" / "train.log").read_text()


def test_cuda_graph_false_never_builds_one(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(vae_cli.module, "graph_blocker", lambda *a, **k: None)
    monkeypatch.setattr(vae_cli.module, "StepGraph", EagerStepGraph)
    EagerStepGraph.calls = 0
    assert run_main("train", f"data_dir={data_dir}", *ARGS, "cuda_graph=false", f"hydra.run.dir={tmp_path / 'r'}") == 0
    assert EagerStepGraph.calls == 0


def trainer(**kw) -> SimpleNamespace:
    from pytorch_lightning.strategies import SingleDeviceStrategy

    fields = dict(strategy=SingleDeviceStrategy(torch.device("cuda", 0)), precision="32-true",
                  gradient_clip_val=None, accumulate_grad_batches=1)
    return SimpleNamespace(**(fields | kw))


def adam(fused: bool) -> torch.optim.Optimizer:
    opt = torch.optim.Adam([torch.zeros(2, requires_grad=True)])
    opt.param_groups[0]["fused"] = fused  # fused=True cannot be built on a CPU; the flag is what is read
    return opt


@pytest.mark.parametrize("kw, fused, reason", [
    ({}, True, None),
    ({"strategy": SimpleNamespace(root_device=torch.device("cpu"))}, True, "not on a CUDA device"),
    ({"strategy": SimpleNamespace(root_device=torch.device("cuda", 0))}, True, "strategy SimpleNamespace"),
    ({"precision": "bf16-mixed"}, True, "trainer.precision=bf16-mixed"),
    ({"gradient_clip_val": 1.0}, True, "trainer.gradient_clip_val=1.0"),
    ({"accumulate_grad_batches": 4}, True, "trainer.accumulate_grad_batches=4"),
    ({}, False, "without fused=true"),
    ({"lr_scheduler_configs": [object()]}, True, "a learning-rate scheduler"),
])
def test_what_keeps_the_step_out_of_a_graph(kw, fused, reason):
    why = graph_blocker(trainer(**kw), adam(fused))
    assert why == reason if reason is None else reason in why


def test_anomaly_detection_keeps_the_step_out_of_a_graph():
    with torch.autograd.set_detect_anomaly(True):
        assert "detect_anomaly" in graph_blocker(trainer(), adam(True))


class FailingStepGraph(StepGraph):
    def capture(self, x: torch.Tensor) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_step_that_cannot_be_captured_runs_op_by_op_after_one_line(tmp_path, data_dir, monkeypatch):
    assert run_main("train", f"data_dir={data_dir}", *ARGS, f"hydra.run.dir={tmp_path / 'plain'}") == 0
    monkeypatch.setattr(vae_cli.module, "graph_blocker", lambda *a, **k: None)
    monkeypatch.setattr(vae_cli.module, "StepGraph", FailingStepGraph)
    assert run_main("train", f"data_dir={data_dir}", *ARGS, f"hydra.run.dir={tmp_path / 'graph'}") == 0
    log = (tmp_path / "graph" / "train.log").read_text()
    assert log.count("could not be captured as a CUDA graph (operation not permitted when stream is capturing)") == 1
    plain, graph = weights(tmp_path / "plain"), weights(tmp_path / "graph")
    assert all(torch.equal(plain[name], graph[name]) for name in plain)


def test_the_module_zeroes_gradients_as_torchs_zero_grad_does_except_after_a_replay():
    """VAEModule.optimizer_zero_grad (a plain loop, not torch's zero_grad with its wrappers): every
    gradient of the optimizer's parameters is None afterwards, as with zero_grad(set_to_none=True);
    after a replayed step (the graph already did it) nothing is touched."""
    from vae_cli.module import VAEModule

    model = torch.nn.Linear(3, 2)
    module = VAEModule(model, torch.optim.Adam)
    opt = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.1}])
    model(torch.ones(4, 3)).sum().backward()
    grads = [p.grad for p in model.parameters()]
    module._replayed = True
    module.optimizer_zero_grad(0, 0, opt)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    module._replayed = False
    module.optimizer_zero_grad(0, 0, opt)
    assert all(p.grad is None for p in model.parameters())
