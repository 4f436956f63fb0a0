"""Exact log p(x) for latent_dim <= 2, by adaptive quadrature over z (no sampling, no proposal).

    log p(x) = log ∫ p(x|z) p(z) dz

The integral is taken with the midpoint rule on a box [-L, L]^D cut into square cells (intervals
in 1-d). All cells start at the same width; at each level the cells that matter are split into
2^D children, the rest are frozen at their last value, and the estimate

    I = log sum_cells exp(log_joint(midpoint) + log volume)

is recomputed. A cell matters when its contribution is within ``threshold`` nats of the example's
largest, when it is a local maximum of log_joint among its neighbours (so a sharp mode that the
coarse grid only brushed, far below the largest cell, is still followed down), or when it borders
such a cell (so a mode near a cell's edge stays inside the refined region). An example stops when
I changes by less than ``tol`` nats from one level to the next and no single cell holds more than
``max_cell_share`` of the total (a guard against two coarse levels agreeing on an unresolved peak).

For a smooth integrand that vanishes at the box's edge the midpoint rule converges faster than any
power of the cell width (for a Gaussian of width sigma the relative error is ~2 exp(-2 pi^2
sigma^2 / h^2) per dimension), so a change below ``tol`` between levels leaves the last level far
more accurate than ``tol``.

Why [-10, 10]^D: the prior N(0, I) puts exp(-52.5) of its mass outside, so what the box leaves out
is that fraction of the largest likelihood, negligible unless the likelihood makes log p(x) more
than ~50 nats worse than sup_z p(x|z); a box of [-6, 6] would not be safe, because the likelihood
can pull a posterior several prior widths into the tail.

Limits: a mode that no grid point sees (narrower than the initial cells AND lying on the slope of
another mode, so it makes no local maximum) can be missed, as by any grid method (raise
``cells``). Kinks (ReLU decoders) slow convergence to O(h^2), so tol far below 1e-3 costs many
levels; a jump of log_joint to -inf where the density is not negligible converges as O(h) and can
stop early. log_joint must be finite or -inf (NaN and +inf raise).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch

LogJoint = Callable[..., torch.Tensor]  # z (N, B, D) -> (N, B); packed: (z (1, M, D), which (M,)) -> (1, M)


@torch.no_grad()
def log_px_quadrature(
    log_joint: LogJoint,
    batch: int,
    dim: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-3,
    half_width: float = 10.0,
    cells: int | None = None,
    threshold: float = 25.0,
    max_cell_share: float = 0.5,
    max_levels: int = 14,
    max_evals: int = 2**18,
    chunk: int = 2**14,
    packed: bool = False,
) -> tuple[torch.Tensor, dict]:
    """log ∫ exp(log_joint(z)) dz over [-half_width, half_width]^dim, per example: ((B,), info).

    ``log_joint(z)``: z (N, B, dim) in ``dtype`` on ``device`` -> (N, B); column b belongs to
    example b, and each example gets its own points (padded so that all share N).
    ``tol``: stop an example when its estimate moves by less than this (nats) between levels.
    ``cells``: cells per side at the first level (width 2 * half_width / cells); default 32 in
    2-d, 1024 in 1-d (1024 points either way). Raise it to see modes narrower than the cells
    that sit on another mode's slope.
    ``threshold``: refine cells whose contribution is within this many nats of the largest
    (e^-25 ~ 1e-11: even 1e5 frozen cells each wrong by their whole size move I by ~1e-6).
    ``max_cell_share``: also require that no cell holds more than this fraction of the total.
    ``max_levels``, ``max_evals``: caps on refinements and on evaluations per example; an example
    that hits one stops with ``converged`` False.
    ``chunk``: the most points (N * B) passed to one log_joint call, which bounds memory
    (at least B: one row per call).
    ``packed``: call ``log_joint(z, which)`` instead, z (1, M, D) with ``which`` (M,) int64 the
    example of each column (repeats allowed): no padding, so examples that need many points do
    not make the others pay for them; the caller gathers its data by ``which``.

    info: ``converged`` (B,) bool, ``change`` (B,) the last change between levels (inf before
    any), ``evals`` (B,) log_joint points per example, ``levels`` (B,) refinements done,
    ``width`` (B,) the finest cell width, ``points`` total points passed to log_joint, padding
    included, ``calls`` log_joint calls.
    """
    if dim not in (1, 2):
        raise ValueError(f"quadrature is for 1 or 2 latent dimensions, got {dim}")
    grid = _Grid(batch, dim, half_width, cells or (32 if dim == 2 else 1024), device, dtype)
    if batch * grid.side(max_levels) ** dim >= 2**62:
        raise ValueError(f"max_levels={max_levels} with batch={batch} would overflow the int64 cell keys")
    evaluator = _Evaluator(log_joint, grid, chunk, packed)
    idx, ex = grid.first_level()                                   # (M, D), (M,)
    val = evaluator(idx, ex, 0)                                    # (M,)
    frozen = torch.full((batch,), -math.inf, dtype=torch.float64, device=grid.device)
    out = torch.full_like(frozen, -math.inf)
    prev = torch.full_like(frozen, math.nan)
    info = _new_info(batch, grid.device)
    info["evals"] += torch.bincount(ex, minlength=batch)
    for level in range(max_levels + 1):
        contrib = val + dim * math.log(grid.width(level))          # (M,) log of value * volume
        largest = _segment_max(contrib, ex, batch)                 # (B,)
        estimate = torch.logaddexp(frozen, _segment_logsumexp(contrib, ex, batch, largest))
        live = torch.zeros(batch, dtype=torch.bool, device=grid.device)
        live[ex] = True                                            # examples still refining
        change = torch.where(estimate == prev, 0.0, (estimate - prev).abs()).nan_to_num(nan=math.inf)
        info["change"] = torch.where(live, change, info["change"])
        out = torch.where(live, estimate, out)
        info["width"] = torch.where(live, grid.width(level), info["width"])
        resolved = largest - estimate < math.log(max_cell_share)
        done = live & torch.isfinite(estimate) & (change < tol) & resolved
        info["converged"] |= done
        keep = _refine_mask(contrib, idx, ex, largest, grid, level, threshold)  # (M,)
        budget = info["evals"] + (2**dim) * torch.bincount(ex[keep], minlength=batch)
        stop = done | (budget > max_evals) | (level == max_levels)
        keep &= ~stop[ex]
        # cells not refined keep their value; those of stopped examples are already in `out`
        frozen = torch.logaddexp(frozen, _segment_logsumexp(contrib[~keep], ex[~keep], batch))
        if not keep.any():
            break
        idx, ex = grid.children(idx[keep], ex[keep])
        val = evaluator(idx, ex, level + 1)
        info["evals"] += torch.bincount(ex, minlength=batch)
        info["levels"] += torch.bincount(ex, minlength=batch).clamp(max=1)
        prev = estimate
    info["points"], info["calls"] = evaluator.points, evaluator.calls
    return out, info


def _new_info(batch: int, device: torch.device) -> dict:
    return {
        "converged": torch.zeros(batch, dtype=torch.bool, device=device),
        "change": torch.full((batch,), math.inf, dtype=torch.float64, device=device),
        "evals": torch.zeros(batch, dtype=torch.int64, device=device),
        "levels": torch.zeros(batch, dtype=torch.int64, device=device),
        "width": torch.zeros(batch, dtype=torch.float64, device=device),
    }


class _Grid:
    """Cell bookkeeping: at level l the box is cut into side(l)^D cells, indexed by ints (M, D)."""

    def __init__(self, batch: int, dim: int, half_width: float, cells: int, device, dtype: torch.dtype) -> None:
        self.batch, self.dim, self.half_width, self.cells = batch, dim, half_width, cells
        self.device, self.dtype = torch.device(device) if device is not None else torch.device("cpu"), dtype

    def side(self, level: int) -> int:
        return self.cells * 2**level

    def width(self, level: int) -> float:
        return 2 * self.half_width / self.side(level)

    def first_level(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cell of level 0, for every example, grouped by example: (B * cells^D, D), (B * cells^D,)."""
        axis = torch.arange(self.cells, device=self.device)
        one = torch.cartesian_prod(*[axis] * self.dim).reshape(-1, self.dim)        # (cells^D, D)
        idx = one.repeat(self.batch, 1)
        ex = torch.arange(self.batch, device=self.device).repeat_interleave(len(one))
        return idx, ex

    def children(self, idx: torch.Tensor, ex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 2^D halves of each cell, one level finer; keeps the cells grouped by example."""
        off = torch.cartesian_prod(*[torch.arange(2, device=self.device)] * self.dim).reshape(-1, self.dim)
        kids = (2 * idx[:, None, :] + off).reshape(-1, self.dim)                   # (M * 2^D, D)
        return kids, ex.repeat_interleave(len(off))

    def midpoints(self, idx: torch.Tensor, level: int) -> torch.Tensor:
        return (-self.half_width + (idx.to(torch.float64) + 0.5) * self.width(level)).to(self.dtype)

    def key(self, idx: torch.Tensor, ex: torch.Tensor, level: int) -> torch.Tensor:
        """One int64 per (example, cell), for finding neighbours by binary search."""
        key = ex.clone()
        for d in range(self.dim):
            key = key * self.side(level) + idx[:, d]
        return key


class _Evaluator:
    """Calls log_joint on the midpoints of cells, at most ``chunk`` points a call.

    Plain: z (N, B, D), example b's points down column b, the short columns padded.
    Packed: z (1, M, D) and ``which`` (M,), the example of each column: no padding at all.
    """

    def __init__(self, log_joint: LogJoint, grid: _Grid, chunk: int, packed: bool) -> None:
        self.log_joint, self.grid, self.chunk, self.packed = log_joint, grid, chunk, packed
        self.points = self.calls = 0

    def __call__(self, idx: torch.Tensor, ex: torch.Tensor, level: int) -> torch.Tensor:
        """log_joint at each cell's midpoint, (M,) float64; ``ex`` must be grouped (sorted)."""
        return self.at(self.grid.midpoints(idx, level), ex)

    def at(self, z_cells: torch.Tensor, ex: torch.Tensor) -> torch.Tensor:
        """log_joint at points z_cells (M, D) of examples ex (M,), grouped: (M,) float64."""
        val = torch.empty(len(ex), dtype=torch.float64, device=ex.device)
        if self.packed:
            for lo in range(0, len(ex), self.chunk):
                sel = slice(lo, lo + self.chunk)
                val[sel] = self._call(z_cells[None, sel], ex[sel])[0]
            return val
        B, rows = self.grid.batch, max(1, self.chunk // self.grid.batch)
        counts = torch.bincount(ex, minlength=B)
        rank = torch.arange(len(ex), device=ex.device) - (counts.cumsum(0) - counts)[ex]  # row in z
        order = torch.argsort(rank, stable=True)      # so that each call's cells are one slice
        starts = list(range(0, int(counts.max()), rows))
        bounds = torch.searchsorted(rank[order], torch.tensor([*starts, len(ex)], device=ex.device)).tolist()
        for r0, lo, hi in zip(starts, bounds[:-1], bounds[1:]):
            sel = order[lo:hi]
            row, col = rank[sel] - r0, ex[sel]
            # padding sits at z = 0, a point where any model is finite; its values are dropped
            z = torch.zeros(int(row.max()) + 1, B, self.grid.dim, dtype=self.grid.dtype, device=ex.device)
            z[row, col] = z_cells[sel]                                             # (N, B, D)
            val[sel] = self._call(z)[row, col]
        return val

    def _call(self, z: torch.Tensor, *which: torch.Tensor) -> torch.Tensor:
        out = self.log_joint(z, *which)
        if out.shape != z.shape[:2]:
            raise ValueError(f"log_joint(z) with z of shape {tuple(z.shape)} returned {tuple(out.shape)}, "
                             f"expected {tuple(z.shape[:2])}")
        if torch.isnan(out).any() or (out == math.inf).any():
            raise ValueError("log_joint returned NaN or +inf; quadrature needs finite values or -inf")
        self.points += out.numel()
        self.calls += 1
        return out.double()


def _refine_mask(contrib: torch.Tensor, idx: torch.Tensor, ex: torch.Tensor, largest: torch.Tensor,
                 grid: _Grid, level: int, threshold: float) -> torch.Tensor:
    """Which cells to split: near the largest, local maxima (modes the grid only brushed), and their neighbours."""
    finite = torch.isfinite(contrib)
    near = finite & (contrib >= largest[ex] - threshold)
    key = grid.key(idx, ex, level)
    order = torch.argsort(key)
    sorted_key = key[order]
    side, local_max, neighbours = grid.side(level), finite.clone(), []
    for off in itertools.product((-1, 0, 1), repeat=grid.dim):
        if not any(off):
            continue
        nidx = idx + torch.tensor(off, device=idx.device)                          # (M, D)
        inside = ((nidx >= 0) & (nidx < side)).all(1)
        nkey = grid.key(nidx.clamp(0, side - 1), ex, level)
        pos = torch.searchsorted(sorted_key, nkey).clamp(max=len(key) - 1)
        found = inside & (sorted_key[pos] == nkey)
        j = order[pos]                                                             # the neighbour's row
        # outside the box counts as -inf; a neighbour inside but not evaluated at this level is
        # unknown, so +inf: the rim of the refined region is not taken for a mode
        nval = torch.where(found, contrib[j], torch.where(inside, math.inf, -math.inf))
        local_max &= contrib >= nval
        neighbours.append((found, j))
    keep = near | local_max
    grown = keep.clone()
    for found, j in neighbours:
        grown |= found & keep[j]
    return grown


def _segment_max(v: torch.Tensor, ex: torch.Tensor, batch: int) -> torch.Tensor:
    """max of v over each example's entries, (B,); -inf for none."""
    out = torch.full((batch,), -math.inf, dtype=torch.float64, device=v.device)
    return out.scatter_reduce(0, ex, v, "amax")


def _segment_logsumexp(v: torch.Tensor, ex: torch.Tensor, batch: int,
                       largest: torch.Tensor | None = None) -> torch.Tensor:
    """log sum exp of v over each example's entries, (B,); -inf for none."""
    m = _segment_max(v, ex, batch) if largest is None else largest
    shift = torch.where(torch.isfinite(m), m, 0.0)
    total = torch.zeros(batch, dtype=torch.float64, device=v.device).index_add(0, ex, (v - shift[ex]).exp())
    return total.log() + shift


def exact_log_px(model: torch.nn.Module, x: torch.Tensor, **settings) -> tuple[torch.Tensor, dict]:
    """log p(x) per example by quadrature over z, for a model with latent_dim <= 2: ((B,), info).

    ``model`` needs ``latent_dim`` and ``log_joint(x, z)`` (z (N, B, D) -> (N, B)), as VAE has;
    ``settings`` go to ``log_px_quadrature`` (tol, half_width, cells, threshold, ...). z is made
    in the dtype of the model's parameters unless ``dtype`` is given. Calls are packed (x is
    gathered per point, no padding) unless ``packed=False``. The encoder plays no part.
    """
    dim = model.latent_dim
    if dim > 2:
        raise ValueError(f"exact log p(x) by quadrature is for latent_dim <= 2; this model has latent_dim={dim}")
    param = next(model.parameters(), None)
    settings.setdefault("device", x.device)
    settings.setdefault("dtype", param.dtype if param is not None else torch.float64)
    if settings.setdefault("packed", True):
        return log_px_quadrature(lambda z, which: model.log_joint(x[which], z), len(x), dim, **settings)
    return log_px_quadrature(lambda z: model.log_joint(x, z), len(x), dim, **settings)
