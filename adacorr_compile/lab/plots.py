"""The lab's figures (matplotlib, headless): the layer x step lambda heatmap of a run, and the
Pareto plot of a calibration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..calibrate import CalibrationResult, psnr_by_rule


def lambda_heatmap(stats: dict[str, Any], path: str, title: str) -> None:
    """Layer x step heatmaps of lambda and of the offset score, with reuse marks (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = stats["regions"]
    lam = np.array([r["lambda_trace"] for r in regions], dtype=float)
    score = np.array([r["score_trace"] for r in regions], dtype=float)
    reuse = np.array([r["reuse_trace"] for r in regions], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(regions) + 2.2), constrained_layout=True)
    measured = int(np.isfinite(lam).any(axis=1).sum())
    # scope="step": one region (the probe) measures for the whole step, the others follow it
    note = ("\none decision per step: lambda and S are measured by the probe (one row); the later blocks follow "
            "its verdict" if measured == 1 < len(regions) else "")
    for ax, data, name, cmap in (
        (axes[0], lam, "lambda = clip(gamma * S, 0, 1)", "magma"),
        (axes[1], score, "offset score S", "viridis"),
        (axes[2], reuse, "reused (1) / computed (0)", "Greys"),
    ):
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(name)
        ax.set_xlabel("denoising step")
        ax.set_yticks(range(len(regions)))
        ax.set_yticklabels([r["path"] for r in regions], fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title + note)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_plot(result: CalibrationResult, path: str | Path) -> None:
    """Two panels against PSNR (by the result's rule, capped at 60 dB): fraction of blocks
    skipped, and speedup (median, bars: min-max of the pairs); the target as a line, the
    chosen setting as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x_of(row: Mapping[str, Any]) -> float:
        return min(psnr_by_rule(row, result.rule), 60.0)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in result.table:
        rest = {k: v for k, v in row["options"].items() if k != "reuse_threshold"}
        groups.setdefault(", ".join(f"{k}={v}" for k, v in sorted(rest.items())) or "thresholds", []).append(row)
    for ax, key, label in ((axes[0], "skipped", "fraction of block evaluations skipped"),
                           (axes[1], "speedup", "speedup vs uncached (median of interleaved pairs)")):
        for name, rows in groups.items():
            rows = sorted(rows, key=lambda r: r["reuse_threshold"])  # the curve in sweep order
            xs, ys = [x_of(r) for r in rows], [r[key] for r in rows]
            if key == "speedup":
                err = [[r["speedup"] - r["speedup_min"] for r in rows], [r["speedup_max"] - r["speedup"] for r in rows]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
            else:
                ax.plot(xs, ys, marker="o", label=name)
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(f"{r['reuse_threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if result.chosen is not None:
            ax.plot([x_of(result.chosen)], [result.chosen[key]], marker="*", markersize=18, color="red",
                    linestyle="none", label=f"chosen: {result.chosen['setting']}")
        if result.target_speed is None:
            ax.axvline(result.target_psnr, color="grey", linestyle="--", label=f"target {result.target_psnr:g} dB")
        elif key == "speedup":
            ax.axhline(result.target_speed, color="grey", linestyle="--", label=f"target {result.target_speed:g}x")
        ax.set_xlabel(f"PSNR vs uncached ({result.rule} over seeds, dB, capped at 60)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"adacorr calibration: seeds {result.seeds}; numbers: reuse_threshold")
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def front_plot(rows: list[Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Speed against plain Inductor (median over rounds; bars: min-max) vs mean PSNR (capped at
    60 dB), one marker series per ``row["family"]``, each family's Pareto front
    (:func:`adacorr_compile.lab.fronts.pareto`) drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fronts import pareto

    families: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    markers = "o^sDvP*Xh<>"
    fig, ax = plt.subplots(figsize=(9, 6), constrained_layout=True)
    for k, (family, members) in enumerate(families.items()):
        xs = [r["speedup"] for r in members]
        ys = [min(r["psnr_mean"], 60.0) for r in members]
        err = [[r["speedup"] - r["speedup_min"] for r in members], [r["speedup_max"] - r["speedup"] for r in members]]
        bars = ax.errorbar(xs, ys, xerr=err, marker=markers[k % len(markers)], linestyle="none", capsize=2,
                           markersize=8, alpha=0.85, label=family)
        front = pareto(members)
        ax.plot([r["speedup"] for r in front], [min(r["psnr_mean"], 60.0) for r in front], color=bars[0].get_color(),
                alpha=0.7)
    ax.set_xlabel("speed vs plain Inductor (median over interleaved rounds; bars: min-max)")
    ax.set_ylabel("PSNR vs plain Inductor's images (mean over images and seeds, dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.savefig(str(path), dpi=100)
    plt.close(fig)
