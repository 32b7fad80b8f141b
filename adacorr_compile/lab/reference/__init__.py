"""Reference models, data and metrics for the adacorr backend.

Everything here runs offline: the glyph dataset is rendered from fonts that
matplotlib ships, and the trained weights are package data under
``weights/`` (reproduce them with ``benchmarks/train_reference.py``).
"""

from .classifier import (
    GlyphClassifier,
    class_accuracy,
    fid_proxy,
    frechet_distance,
    load_reference_classifier,
)
from .data import HELDOUT_SEED, NUM_CLASSES, TRAIN_SEED, class_names, make_dataset
from .models import (
    DIT_SCHEDULER_CONFIG,
    REFERENCE_LOADERS,
    ClassConditioned,
    ClassConditionedFlux,
    ClassConditionedSD3,
    build_dit,
    build_flux,
    build_sd3,
    dit_config,
    flux_config,
    load_reference,
    load_reference_dit,
    load_reference_flux,
    load_reference_sd3,
    sd3_config,
    tiny_dit_config,
    tiny_flux_config,
    tiny_sd3_config,
)

__all__ = [
    "DIT_SCHEDULER_CONFIG",
    "HELDOUT_SEED",
    "NUM_CLASSES",
    "REFERENCE_LOADERS",
    "TRAIN_SEED",
    "ClassConditioned",
    "ClassConditionedFlux",
    "ClassConditionedSD3",
    "GlyphClassifier",
    "build_dit",
    "build_flux",
    "build_sd3",
    "class_accuracy",
    "class_names",
    "dit_config",
    "fid_proxy",
    "flux_config",
    "frechet_distance",
    "load_reference",
    "load_reference_classifier",
    "load_reference_dit",
    "load_reference_flux",
    "load_reference_sd3",
    "make_dataset",
    "sd3_config",
    "tiny_dit_config",
    "tiny_flux_config",
    "tiny_sd3_config",
]
