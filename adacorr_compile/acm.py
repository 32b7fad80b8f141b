"""Adaptive Correction Module: the paper's weight and blend as pure tensor functions.

Paper (arXiv 2602.13357, Eq. 6-7 and Proposition 1):

* ``lambda = clip(gamma * S, 0, 1)``
* ``h_hat = (1 - lambda) * h_cached + lambda * h_fresh``
* ``|| h - h_hat || <= (1 - lambda) * L * tau * S`` for an L-Lipschitz block reused with lag tau.

``lambda`` may be a scalar (one decision for the batch) or a ``[B]`` vector (one
per sample); it broadcasts over the remaining dimensions.
"""

from __future__ import annotations

import torch


def correction_weight(score: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``lambda = clip(gamma * S, 0, 1)``; NaN scores map to 1 (recompute)."""
    lam = (gamma * score).clamp(0.0, 1.0)
    return torch.nan_to_num(lam, nan=1.0)


def blend(cached: torch.Tensor, fresh: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``(1 - lambda) * cached + lambda * fresh``."""
    w = per_sample(lam.to(fresh.dtype), fresh)
    return cached + w * (fresh - cached)


def corrected_cache(h: torch.Tensor, cached_residual: torch.Tensor) -> torch.Tensor:
    """The offset-corrected cache: the current input plus the block's residual at its
    last fresh compute, i.e. the cached output shifted by the input's offset."""
    return h + cached_residual


def extrapolate(value: torch.Tensor, previous: torch.Tensor, k: float | torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """First-order forecast of a cached value: ``value + (value - previous) * k``, where
    ``k`` is how far past the last compute the current step lies, in units of the gap
    between the last two computes (TaylorSeer order 1): a float, or a 0-d tensor of the
    values' dtype (the ONNX export computes it in-graph). Where ``usable`` (0-d bool) is
    False, e.g. ``previous`` came from a non-finite compute, ``value`` as it is (a device
    ``where``, no host read)."""
    return torch.where(usable, torch.lerp(previous, value, 1.0 + k), value)


def steady(
    new: list[torch.Tensor], old: list[torch.Tensor], gap: float | torch.Tensor, max_change: float | torch.Tensor
) -> torch.Tensor:
    """Whether cached values changed slowly enough between two computes ``gap`` steps apart
    for a first-order forecast from them (``forecast_max_change``): ``||new - old|| <=
    max_change * gap * ||new||`` over all streams (0-d bool; False where anything is not
    finite). A residual that moves by more than that share of its size per step is in a
    fast, curved phase (the first steps of flow-matching models), where extrapolating its
    last difference overshoots: it is then reused as it was. The one definition, for the
    runtime's refresh, the probe's forecast reference and the ONNX step graph (``gap`` a
    float, or a 0-d tensor there; ``max_change`` a float, or a 0-d tensor where a compiled
    kernel takes it as an input). An infinite ``max_change`` always holds."""
    if not isinstance(max_change, torch.Tensor) and max_change == float("inf"):  # 0 * inf would be NaN
        return torch.ones((), dtype=torch.bool, device=new[0].device)
    return steady_from_sums(steady_sums(new, old), gap, max_change)


def steady_sums(new: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """:func:`steady`'s two sums, ``[sum (new - old)^2, sum new^2]`` over all streams
    (float32): sums over the elements, so the ranks holding shards of the values can add
    theirs (a decision group's all-reduce) before :func:`steady_from_sums`."""
    change = torch.stack([(n.float() - o.float()).square().sum() for n, o in zip(new, old)]).sum()
    size = torch.stack([n.float().square().sum() for n in new]).sum()
    return torch.stack([change, size])


def steady_from_sums(sums: torch.Tensor, gap: float | torch.Tensor, max_change: float | torch.Tensor) -> torch.Tensor:
    """:func:`steady` from its (summed) :func:`steady_sums`."""
    holds = sums[0].sqrt() <= sums[1].sqrt() * (gap * max_change)
    return holds | torch.isinf(max_change) if isinstance(max_change, torch.Tensor) else holds


def reuse_values(
    inputs: list[torch.Tensor], cached: list[torch.Tensor], previous: list[torch.Tensor] | None,
    k: float | torch.Tensor, usable: torch.Tensor | None, residuals: bool,
) -> list[torch.Tensor]:
    """What a reuse returns per stream: the cache, forecast from the previous compute's
    values where ``previous`` is given (:func:`extrapolate`), added to the current input
    when it holds residuals (:func:`corrected_cache`), else the cached outputs themselves.
    The one definition of a reuse, for the runtime (``k`` a float it computed on the host)
    and the ONNX step graph (``k`` a 0-d tensor)."""
    if previous is not None:
        cached = [extrapolate(c, p, k if isinstance(k, float) else k.to(c.dtype), usable) for c, p in zip(cached, previous)]
    if residuals:
        return [corrected_cache(h, r) for h, r in zip(inputs, cached)]
    return list(cached)


def forecast_reference(
    reference: list[torch.Tensor], previous: list[torch.Tensor], k: torch.Tensor, gap: torch.Tensor,
    max_change: float | torch.Tensor, usable: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``probe_forecast``: the probe's reference extrapolated to the current step from its
    last two values (``gap`` steps apart, the current step ``k`` gaps past the last), where
    the change between them was steady (:func:`steady`), else the reference as it is: what a
    reuse of this step returns for the first block, so the score measures the drift the reuse
    would carry. ``usable`` (0-d bool): the two values are of distinct steps (the ONNX step
    graph's state; the runtime checks it on the host). The one definition, for the runtime's
    fused OEM and the ONNX step graph."""
    holds = steady(reference, previous, gap, max_change)
    usable = holds if usable is None else holds & usable
    return [extrapolate(r, p, k.to(r.dtype), usable) for r, p in zip(reference, previous)]


def all_finite(values: list[torch.Tensor]) -> torch.Tensor:
    """Whether every element of every tensor is finite (0-d bool): a cache's ``valid`` flag."""
    return torch.stack([torch.isfinite(v).all() for v in values]).all()


def fresh_residuals(fresh: list[torch.Tensor], inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The cache a compute leaves: ``fresh - inputs`` per stream, and whether all of it is
    finite (0-d bool). The one definition of a refresh's math, for the runtime's fused kernel
    and the ONNX step graph."""
    residuals = [f - x for f, x in zip(fresh, inputs)]
    return residuals, all_finite(residuals)


def per_sample(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` flags or weights shaped to broadcast over ``like``'s sample dimension (0-d: as
    they are)."""
    return flags if flags.dim() == 0 else flags.reshape(flags.shape[0], *([1] * (like.dim() - 1)))


def keep_samples(keep: torch.Tensor, old: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """A partial (per-sample) refresh: where ``keep`` (``[B]`` bool) a sample keeps its
    ``old`` value, elsewhere it takes the ``new`` one. The one definition, for the runtime and
    the ONNX step graph (a reused sample's output, cache and reference input)."""
    return [torch.where(per_sample(keep, n), o, n) for o, n in zip(old, new)]


def error_bound(lam: torch.Tensor, lipschitz: float, lag: float, score: torch.Tensor) -> torch.Tensor:
    """Proposition 1's bound ``(1 - lambda) * L * tau * S``."""
    return (1.0 - lam) * lipschitz * lag * score
