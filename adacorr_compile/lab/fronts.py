"""Quality/speed fronts (``benchmarks/front.py``): the Pareto front of a family of settings
(speed against plain Inductor vs PSNR against its images), and the comparison of our best
setting with the peers' best at each speed level. Pure functions on result rows (dicts with
``speedup``, ``psnr_mean``, ``psnr_worst``, ``psnr_seed_means``, ``method``, ``family``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

Row = Mapping[str, Any]
# PSNRs this close count as equal: the same algorithm in two runtimes (our runtime with FBCache's
# decision rule against cache-dit's) agrees to float round-off, far under the 0.1 dB the tables show
TIE_DB = 0.01


def pareto(rows: Sequence[Row], speed: str = "speedup", quality: str = "psnr_mean") -> list[Row]:
    """The rows no other row beats in both ``speed`` and ``quality`` (higher is better in
    both), by rising speed."""
    front = [r for r in rows
             if not any(o[speed] >= r[speed] and o[quality] >= r[quality] and (o[speed], o[quality]) != (r[speed], r[quality])
                        for o in rows)]
    return sorted(front, key=lambda r: r[speed])


def speed_levels(top: float, start: float = 1.5, step: float = 0.5) -> list[float]:
    """``start, start + step, ...`` up to ``top`` (the highest speed reached), then ``top`` itself
    (rounded down to 0.01, so that the row that reached it counts) where it is more than 0.05 past
    the last level; empty below ``start``."""
    if not math.isfinite(top) or top < start:
        return []
    levels = [start + step * k for k in range(int((top - start) / step + 1e-9) + 1)]
    return levels + ([math.floor(top * 100) / 100] if top - levels[-1] > 0.05 else [])


def best_at(rows: Sequence[Row], level: float, quality: str = "psnr_mean") -> Row | None:
    """The row with the highest ``quality`` among those at least ``level`` fast (median speed), or None."""
    fast = [r for r in rows if r["speedup"] >= level]
    return max(fast, key=lambda r: r[quality]) if fast else None


def _verdict(ours: Row | None, peer: Row | None) -> str:
    """``"ahead"`` (ours at least as good in mean and worst-image PSNR), ``"within spread"`` (ours
    below in the mean, but not below the peer's worst per-seed mean), ``"behind"``; or why there is
    nothing to compare."""
    if ours is None:
        return "behind: no setting of ours this fast"
    if peer is None:
        return "ahead: no peer setting this fast"
    d_mean, d_worst = ours["psnr_mean"] - peer["psnr_mean"], ours["psnr_worst"] - peer["psnr_worst"]
    if d_mean >= -TIE_DB and d_worst >= -TIE_DB:
        if d_mean >= 0 and d_worst >= 0:
            return "ahead"
        if d_mean > TIE_DB:
            return f"ahead in mean, level on the worst image (within {TIE_DB:g} dB)"
        if d_worst > TIE_DB:
            return f"level in mean (within {TIE_DB:g} dB), ahead on the worst image"
        return f"level (within {TIE_DB:g} dB in both)"
    if ours["psnr_mean"] >= peer["psnr_mean"]:
        return "ahead in mean, behind in worst image"
    if ours["psnr_mean"] >= min(peer.get("psnr_seed_means") or [peer["psnr_mean"]]):
        return "within spread (below in mean, within the peer's per-seed spread)"
    return "behind"


def _ahead_in_both(rows: Sequence[Row], level: float, peer: Row | None) -> Row | None:
    """Among ``rows`` at least ``level`` fast, the best in mean PSNR of those at least as good as
    ``peer`` in both mean and worst-image PSNR (within :data:`TIE_DB`), or None."""
    if peer is None:
        return None
    both = [r for r in rows if r["speedup"] >= level and r["psnr_mean"] >= peer["psnr_mean"] - TIE_DB
            and r["psnr_worst"] >= peer["psnr_worst"] - TIE_DB]
    return max(both, key=lambda r: r["psnr_mean"]) if both else None


def compare_levels(ours: Sequence[Row], peers: Sequence[Row], levels: Sequence[float]) -> list[dict[str, Any]]:
    """Per speed level: our best setting against the peers' best (highest mean PSNR among the
    settings at least that fast), with both PSNRs (mean, worst image) and a verdict
    (:func:`_verdict`). Ours is the best in the mean unless that one is behind the peer on the
    worst image while another of ours at the level is at least as good in both: then that one (a
    user who picks a setting at that speed can have both)."""
    out = []
    for level in levels:
        a, b = best_at(ours, level), best_at(peers, level)
        if a is not None and b is not None and a["psnr_worst"] < b["psnr_worst"]:
            a = _ahead_in_both(ours, level, b) or a
        entry: dict[str, Any] = {"level": level, "verdict": _verdict(a, b)}
        for side, row in (("ours", a), ("peer", b)):
            entry[side] = None if row is None else {k: row[k] for k in ("method", "speedup", "psnr_mean", "psnr_worst")}
        out.append(entry)
    return out
