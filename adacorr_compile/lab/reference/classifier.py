"""Glyph classifier and sample-quality metrics.

:class:`GlyphClassifier` is a small CNN trained on clean synthetic glyph images
(:mod:`adacorr_compile.lab.reference.data`). It scores generated samples in two
ways:

* :func:`class_accuracy` -- fraction of samples classified as the requested class;
* :func:`frechet_distance` on :meth:`GlyphClassifier.features` (penultimate
  layer) -- a Frechet-distance FID proxy between two image sets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import WEIGHTS_DIR, _load_state, _read_json

logger = logging.getLogger("adacorr_compile.reference")


def classifier_config(num_classes: int = 10) -> dict[str, Any]:
    return {"num_classes": num_classes, "channels": [16, 32, 64], "feature_dim": 128}


class GlyphClassifier(nn.Module):
    """Three conv stages (two 3x3 convs + GroupNorm + SiLU each), global average
    pooling, a ``feature_dim`` hidden layer (the features) and a linear head."""

    def __init__(self, num_classes: int = 10, channels: list[int] | tuple[int, ...] = (16, 32, 64),
                 feature_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
                c_in = c
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [B, feature_dim] of images in [-1, 1]."""
        h = self.conv(x).mean(dim=(2, 3))
        return F.silu(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(config: dict[str, Any]) -> GlyphClassifier:
    return GlyphClassifier(config["num_classes"], tuple(config["channels"]), config["feature_dim"])


def load_reference_classifier(weights_dir: str | Path | None = None) -> GlyphClassifier:
    """The trained reference classifier (eval, float32, CPU)."""
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    meta = _read_json(d / "classifier_config.json")
    model = build_classifier(meta["model"])
    model.load_state_dict(_load_state(d / "classifier.safetensors"), strict=True)
    logger.debug("loaded reference classifier from %s", d)
    return model.float().eval()


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted class index per image."""
    out = [classifier(images[i:i + batch_size].float()).argmax(dim=1)
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def extract_features(classifier: GlyphClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``classifier.features`` over a large image set, in batches."""
    out = [classifier.features(images[i:i + batch_size].float())
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


def class_accuracy(classifier: nn.Module, images: torch.Tensor, labels: Any) -> float:
    """Fraction of ``images`` that ``classifier`` assigns to ``labels``."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    was_training = classifier.training
    classifier.eval()
    try:
        pred = predict(classifier, images)
    finally:
        classifier.train(was_training)
    return float((pred.cpu() == labels).float().mean())


def _scipy_sqrtm():
    try:
        from scipy import linalg  # type: ignore
    except ImportError:
        return None
    return linalg.sqrtm


def _trace_sqrt_product(cov_a: torch.Tensor, cov_b: torch.Tensor) -> float:
    """tr(sqrt(A B)) for symmetric PSD A, B (float64).

    Uses tr(sqrt(A B)) = tr(sqrt(A^1/2 B A^1/2)), whose argument is symmetric
    PSD, so two symmetric eigen-decompositions suffice.
    """
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    m = (m + m.T) / 2
    return float(torch.linalg.eigvalsh(m).clamp(min=0).sqrt().sum())


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D].

    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr(sqrt(C_a C_b))``. Uses
    ``scipy.linalg.sqrtm`` when scipy is installed, else a torch eigen-decomposition.
    """
    a = torch.as_tensor(np.asarray(feats_a) if not torch.is_tensor(feats_a) else feats_a).double().cpu()
    b = torch.as_tensor(np.asarray(feats_b) if not torch.is_tensor(feats_b) else feats_b).double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [N, D] feature sets with equal D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    sqrtm = _scipy_sqrtm()
    if sqrtm is not None:
        covmean = sqrtm(cov_a.numpy() @ cov_b.numpy())
        tr_covmean = float(np.real(np.trace(covmean)))
    else:
        tr_covmean = _trace_sqrt_product(cov_a, cov_b)
    diff = float((mu_a - mu_b).square().sum())
    return max(diff + float(torch.trace(cov_a)) + float(torch.trace(cov_b)) - 2.0 * tr_covmean, 0.0)


def fid_proxy(classifier: GlyphClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between the classifier features of two image sets."""
    classifier.eval()
    return frechet_distance(extract_features(classifier, images_a), extract_features(classifier, images_b))


def save_classifier_meta(path: Path, config: dict[str, Any], extra: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"model": config, **extra}, f, indent=2, sort_keys=True)
