"""The whole training step as one CUDA graph: forward, backward and the optimizer's update.

On a GPU a small VAE's step is a few hundred microseconds of kernels behind milliseconds of Python
(ours, Lightning's, torch.distributions'), so the GPU waits on the host (README, Speed). Captured
once and replayed for every batch of the same shape, the step's kernels launch as one graph and the
Python runs once. This is PyTorch's "whole-network capture" (torch.cuda.graph; CUDA graphs in the
CUDA C++ Programming Guide): a static input that each replay reads, outputs that each replay
overwrites, parameters and optimizer state updated in place. Random draws stay fresh at every
replay: torch registers the CUDA generator with the graph and advances its offset per replay.

What the captured step needs, and why `VAEModule` only uses it when all hold (``graph_blocker``):
one CUDA device under Lightning's single-device strategy (DDP's gradient hooks are not captured
here), no anomaly detection, float32 (no gradient scaler), no
gradient clipping or accumulation (Lightning would run those between backward and step), no
learning-rate schedule (the update's lr is fixed at capture), and an optimizer whose update reads
no host value (fused Adam keeps its step count on the device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepGraph:
    """forward(x) -> (loss, *outputs); a call runs forward, loss.backward() and optimizer.step()
    for x, captured as one CUDA graph at the first call and replayed at the next ones. Returns
    (loss, *outputs), detached: tensors that the next call overwrites (read or copy them first)."""

    def __init__(self, forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        self.forward, self.optimizer, self.warmup = forward, optimizer, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x: torch.Tensor | None = None          # the static input, (B, C, H, W)
        self.outputs: tuple[torch.Tensor, ...] = ()

    def fits(self, x: torch.Tensor) -> bool:
        """True if x can be replayed: the captured shape (a smaller last batch runs op by op)."""
        return self.x is None or (x.shape == self.x.shape and x.dtype == self.x.dtype and x.device == self.x.device)

    def capture(self, x: torch.Tensor) -> None:
        """Record the step for batches shaped like x. The optimizer must already hold its state
        (one ordinary step first): a first step inside the graph would re-create it at each replay."""
        validate, stream = torch.distributions.Distribution._validate_args, torch.cuda.current_stream()
        # A distribution's argument checks read a value on the host, which a capture forbids: ours are
        # built with validate_args=False, and the default is off for any other (a flow library's).
        torch.distributions.Distribution.set_default_validate_args(False)
        try:
            self._record(x)
        finally:
            torch.distributions.Distribution.set_default_validate_args(validate)
            torch.cuda.set_stream(stream)  # a failed capture_end skips torch.cuda.graph's return to it

    def _record(self, x: torch.Tensor) -> None:
        self.x = x.clone()
        # Warm-up on a side stream before capture, as torch.cuda.graph's notes ask: lazy set-up
        # (cuBLAS/cuDNN workspaces, autograd's streams) must not happen inside the capture.
        # Gradients only, no update: the warm-up leaves the parameters as they were.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.forward(self.x)[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        # No gradients going in: the captured backward then writes fresh ones at every replay
        # rather than adding to the last.
        self.optimizer.zero_grad(set_to_none=True)
        groups = self.optimizer.param_groups
        flags = [group.get("capturable", False) for group in groups]
        for group in groups:  # only the capture's health check reads it: fused Adam runs the same either way
            group["capturable"] = True
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss, *outputs = self.forward(self.x)
                loss.backward()
                self.optimizer.step()
        finally:
            for group, flag in zip(groups, flags):
                group["capturable"] = flag
        self.graph, self.outputs = graph, (loss.detach(), *(o.detach() for o in outputs))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # After capture, p.grad of each parameter is the graph's own buffer; an op-by-op step in
        # between (optimizer.zero_grad(), backward) points it elsewhere, while the replay keeps
        # writing and reading its own: read gradients only of an op-by-op step.
        if self.graph is None:
            self.capture(x)
        self.x.copy_(x)
        self.graph.replay()
        return self.outputs


def graph_blocker(trainer, optimizer: torch.optim.Optimizer) -> str | None:
    """Why this fit cannot replay its training step as a CUDA graph, or None if it can."""
    from pytorch_lightning.strategies import SingleDeviceStrategy

    if trainer.strategy.root_device.type != "cuda":
        return "not on a CUDA device"
    if not isinstance(trainer.strategy, SingleDeviceStrategy):  # DDP's gradient hooks, even with one process
        return f"strategy {type(trainer.strategy).__name__} (one device, no DDP)"
    if torch.is_anomaly_enabled():
        return "trainer.detect_anomaly=true (its checks read values on the host)"
    if str(trainer.precision) not in ("32-true", "32"):
        return f"trainer.precision={trainer.precision} (float32 only)"
    if trainer.gradient_clip_val:
        return f"trainer.gradient_clip_val={trainer.gradient_clip_val}"
    if trainer.accumulate_grad_batches != 1:
        return f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}"
    if getattr(trainer, "lr_scheduler_configs", None):  # a float lr would be fixed in the graph at capture
        return "a learning-rate scheduler (the lr changes at every step)"
    if not all(group.get("fused") for group in optimizer.param_groups):
        return (f"{type(optimizer).__name__} without fused=true (the graph needs an update that reads nothing "
                "on the host: fused Adam or AdamW)")
    return None
