"""Offset Estimation Module: the paper's drift measures as pure tensor functions.

All functions take a block's stream input ``h`` shaped ``[B, ..., D]`` (batch,
token dimensions, channels; a DiT stream is ``[B, P, D]``) or a sequence of such
tensors for a block with several streams (an SD3/Flux dual-stream block): tokens of
all streams are pooled, each token counting once. With ``per_sample=True`` each
function returns one value per batch element (shape ``[B]``), otherwise a scalar
averaged over the batch, exactly the paper's ``1/(B*P) * sum_{b,i}``.

Paper (arXiv 2602.13357, Eq. 1-3), for block input ``h_t`` at step ``t``:

* ``D_temp = 1/(B*P) sum_{b,i} || h_t[b,i,:] - h_{t-1}[b,i,:] ||_2``
* ``D_spat = 1/(B*P) sum_{b,i} sqrt(Var_d h_t[b,i,d])``
* ``S = D_temp^2 + lambda_s * D_spat``
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

Streams = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_list(h: Streams) -> list[torch.Tensor]:
    return [h] if isinstance(h, torch.Tensor) else list(h)


def _token_mean(per_token: Sequence[torch.Tensor], per_sample: bool) -> torch.Tensor:
    """Mean over all tokens of all streams of per-token values shaped ``[B, ...]``."""
    sums = sum(v.flatten(1).sum(1) for v in per_token)
    count = sum(v[0].numel() for v in per_token)
    per_b = sums / count
    return per_b if per_sample else per_b.mean()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def temporal_deviation(h: Streams, h_prev: Streams, per_sample: bool = False) -> torch.Tensor:
    """``D_temp``: mean over tokens of the L2 norm (over channels) of ``h - h_prev``."""
    norms = [torch.linalg.vector_norm(_f32(a) - _f32(b), dim=-1) for a, b in zip(_as_list(h), _as_list(h_prev), strict=True)]
    return _token_mean(norms, per_sample)


def spatial_variation(h: Streams, per_sample: bool = False) -> torch.Tensor:
    """``D_spat``: mean over tokens of the channel standard deviation (population variance)."""
    stds = [torch.var(_f32(a), dim=-1, unbiased=False).sqrt() for a in _as_list(h)]
    return _token_mean(stds, per_sample)


def token_norm(h: Streams, per_sample: bool = False) -> torch.Tensor:
    """Mean over tokens of the per-token L2 norm: the scale used by the relative score."""
    return _token_mean([torch.linalg.vector_norm(_f32(a), dim=-1) for a in _as_list(h)], per_sample)


def token_rms(h: Streams, per_sample: bool = False) -> torch.Tensor:
    """Mean over tokens of the per-token root-mean-square over channels."""
    return _token_mean([_f32(a).pow(2).mean(-1).sqrt() for a in _as_list(h)], per_sample)


def offset_score(d_temp: torch.Tensor, d_spat: torch.Tensor, spatial_weight: float = 1.0) -> torch.Tensor:
    """The paper's offset score ``S = D_temp^2 + spatial_weight * D_spat``."""
    return d_temp.pow(2) + spatial_weight * d_spat


def paper_offset_score(h: Streams, h_prev: Streams, spatial_weight: float = 1.0, per_sample: bool = False) -> torch.Tensor:
    """The paper's score computed from the block inputs."""
    return offset_score(temporal_deviation(h, h_prev, per_sample), spatial_variation(h, per_sample), spatial_weight)


def relative_offset_score(
    h: Streams, h_prev: Streams, spatial_weight: float = 1.0, per_sample: bool = False, eps: float = 1e-12
) -> torch.Tensor:
    """Scale-free offset score ``S_rel = delta^2 + spatial_weight * delta * sigma``.

    * ``delta = D_temp(h, h_prev) / token_norm(h_prev)``: the drift relative to the
      size of the tokens it moved;
    * ``sigma = D_spat(h) / token_rms(h)``: spatial variation relative to the token
      scale, in [0, 1].

    It keeps the paper's form (a squared temporal term plus a spatial term), but
    the spatial term is gated by the drift: an unchanged input scores exactly 0
    (its cache is exact, which Proposition 1's bound ``(1-lambda) L tau S`` should
    reflect), while the paper's ``D_spat`` is nonzero for any non-constant input
    and, on hidden states of unit scale, alone pushes ``lambda = gamma*S`` to 1.
    Multiplying both inputs by any ``c != 0`` leaves ``S_rel`` unchanged.
    """
    delta = temporal_deviation(h, h_prev, per_sample) / (token_norm(h_prev, per_sample) + eps)
    sigma = spatial_variation(h, per_sample) / (token_rms(h, per_sample) + eps)
    return delta.pow(2) + spatial_weight * delta * sigma


def score(
    variant: str, h: Streams, h_prev: Streams, spatial_weight: float = 1.0, per_sample: bool = False
) -> torch.Tensor:
    """Dispatch on the config's ``score`` field: ``"paper"`` or ``"relative"``."""
    if variant == "paper":
        return paper_offset_score(h, h_prev, spatial_weight, per_sample)
    if variant == "relative":
        return relative_offset_score(h, h_prev, spatial_weight, per_sample)
    raise ValueError(f"score variant {variant!r}; expected 'paper' or 'relative'")


# --------------------------------------------------------------------------- partial sums
# Under context parallelism each rank holds a shard of the tokens. Every token mean above is a
# sum over tokens divided by their count, so a rank can give its sums and counts instead, the
# ranks' sums are added (one SUM all-reduce), and the score is computed from the totals: the
# exact score of the whole sequence, whatever the shard sizes (not a mean of per-rank means).
# Ranks that hold the same tokens (tensor parallelism: replicated block inputs) add equal sums
# and counts alike, which leaves every mean unchanged.

PARTIALS = 5  # per sample: sums of D_temp, of the reference's token norm, of D_spat, of the token RMS; the count


def score_partials(h: Streams, h_prev: Streams) -> torch.Tensor:
    """``[B, PARTIALS]`` float32: per sample, the token sums of the four per-token terms of
    the scores above (temporal deviation, the reference's token norm, spatial variation,
    token RMS) and the number of tokens (all streams pooled)."""
    hs, hp = _as_list(h), _as_list(h_prev)
    terms = [
        [torch.linalg.vector_norm(_f32(a) - _f32(b), dim=-1) for a, b in zip(hs, hp, strict=True)],
        [torch.linalg.vector_norm(_f32(b), dim=-1) for b in hp],
        [torch.var(_f32(a), dim=-1, unbiased=False).sqrt() for a in hs],
        [_f32(a).pow(2).mean(-1).sqrt() for a in hs],
    ]
    sums = [sum(v.flatten(1).sum(1) for v in per_token) for per_token in terms]
    count = sum(v[0].numel() for v in terms[0])
    return torch.stack([*sums, torch.full_like(sums[0], float(count))], dim=1)


def score_from_partials(
    variant: str, partials: torch.Tensor, spatial_weight: float = 1.0, per_sample: bool = False, eps: float = 1e-12
) -> torch.Tensor:
    """:func:`score` from (summed) :func:`score_partials`: each token mean is a sum over the
    count, per sample, then averaged over the batch unless ``per_sample``."""
    means = partials[:, :4] / partials[:, 4:5]
    means = means if per_sample else means.mean(0)
    d_temp, ref_norm, d_spat, rms = means.unbind(-1)
    if variant == "paper":
        return offset_score(d_temp, d_spat, spatial_weight)
    if variant == "relative":
        delta = d_temp / (ref_norm + eps)
        return delta.pow(2) + spatial_weight * delta * (d_spat / (rms + eps))
    raise ValueError(f"score variant {variant!r}; expected 'paper' or 'relative'")
