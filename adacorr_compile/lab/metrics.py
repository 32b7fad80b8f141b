"""Image quality for the lab: PSNR and SSIM against the uncached images (scikit-image), and
with the reference classifier class accuracy and the Frechet distance to real data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor,
              value_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[list[float], list[float]]:
    """Per-image PSNR (dB) and SSIM of images against the reference (scikit-image), both
    clamped to ``value_range`` (default: images in [-1, 1]), whose width is the data range.
    Any ``[N, ...]`` tensor works: its first axis counts the images, the second is taken as
    channels; SSIM is NaN for an image too small for its 7x7 window."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    lo, hi = float(value_range[0]), float(value_range[1])
    data_range = hi - lo
    psnr, ssim = [], []
    for a, b in zip(images.clamp(lo, hi).numpy(), reference.clamp(lo, hi).numpy()):
        a_hwc, b_hwc = (np.moveaxis(a, 0, -1), np.moveaxis(b, 0, -1)) if a.ndim >= 3 else (a, b)
        if np.array_equal(a_hwc, b_hwc):
            psnr.append(float("inf"))
        else:
            psnr.append(float(peak_signal_noise_ratio(b_hwc, a_hwc, data_range=data_range)))
        if a.ndim < 2 or min(a_hwc.shape[:-1] if a.ndim >= 3 else a_hwc.shape) < 7:
            ssim.append(float("nan"))
        else:
            ssim.append(float(structural_similarity(b_hwc, a_hwc, data_range=data_range,
                                                    channel_axis=-1 if a.ndim >= 3 else None)))
    return psnr, ssim


def quality(
    images: torch.Tensor,
    reference: torch.Tensor,
    labels: list[int],
    classifier: Any = None,
    real_features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fidelity to the uncached output (PSNR, SSIM: mean and worst) and, given the
    reference classifier, class accuracy and the Frechet distance to real data."""
    psnr, ssim = psnr_ssim(images, reference)
    finite = [p for p in psnr if np.isfinite(p)]
    out = {
        "psnr_mean": float(np.mean(finite)) if finite else float("inf"),
        "psnr_min": float(min(psnr)),
        "ssim_mean": float(np.mean(ssim)),
        "ssim_min": float(min(ssim)),
    }
    if classifier is not None:
        from .reference.classifier import class_accuracy, extract_features, frechet_distance

        out["class_accuracy"] = float(class_accuracy(classifier, images, torch.tensor(labels)))
        if real_features is not None:
            out["fid_proxy"] = float(frechet_distance(extract_features(classifier, images), real_features))
    return out


def seed_scores(output: torch.Tensor, reference: torch.Tensor, value_range: tuple[float, float] | None) -> dict[str, float]:
    """Per-image PSNR and SSIM (:func:`psnr_ssim`) of one seed's output:
    mean over its images (identical images, infinite PSNR, left out of the mean as the benchmark
    does) and the worst image. SSIM is NaN where the images are too small for its 7x7 window."""
    if output.shape != reference.shape:
        raise ValueError(f"calibrate: a cached generation returned shape {tuple(output.shape)}, the uncached one "
                         f"{tuple(reference.shape)}")
    if value_range is None:
        lo, hi = float(reference.min()), float(reference.max())
        if hi <= lo:
            hi = lo + 1.0
    else:
        lo, hi = map(float, value_range)
    if output.dim() < 2:
        output, reference = output[None], reference[None]
    psnr, ssim = psnr_ssim(output, reference, value_range=(lo, hi))
    finite = [p for p in psnr if math.isfinite(p)]
    good_ssim = [s for s in ssim if math.isfinite(s)]
    return {
        "psnr": float(np.mean(finite)) if finite else math.inf,
        "psnr_worst_image": float(min(psnr)),
        "ssim": float(np.mean(good_ssim)) if good_ssim else math.nan,
    }
