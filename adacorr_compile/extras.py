"""extras: which optional packages a feature needs, and one clear error when they are missing.

The compiler needs torch alone. The lab (:mod:`adacorr_compile.lab`: reference models,
samplers, the measurement harness, the demo) and the parts of calibration that score images
(PSNR / SSIM with scikit-image) and draw (matplotlib) need the ``lab`` extra. A feature checks
for its packages before it starts (:func:`require_lab`), so that a missing one is one
:class:`LabMissing` naming it and the command that installs it, not an ``ImportError`` from
deep inside a run. This module imports nothing of the lab.
"""

from __future__ import annotations

import importlib.util

LAB_INSTALL = 'pip install "adacorr_compile[lab]"'

# the lab extra's packages: import name -> distribution name (pyproject.toml, [project.optional-dependencies] lab)
LAB_PACKAGES = {
    "diffusers": "diffusers", "safetensors": "safetensors", "numpy": "numpy", "tqdm": "tqdm",
    "matplotlib": "matplotlib", "skimage": "scikit-image",
}


class LabMissing(ImportError):
    """A feature of the lab extra was asked for and one of its packages is not installed."""


def missing(packages: tuple[str, ...] | list[str]) -> list[str]:
    """The distributions among ``packages`` (import names) that cannot be imported."""
    return [LAB_PACKAGES.get(name, name) for name in packages if importlib.util.find_spec(name) is None]


def require_lab(feature: str, packages: tuple[str, ...] | list[str] = tuple(LAB_PACKAGES)) -> None:
    """Raise :class:`LabMissing` if any of ``packages`` (import names; default: the whole lab
    extra) is not installed, naming ``feature``, the missing ones and the install command."""
    absent = missing(packages)
    if absent:
        raise LabMissing(f"{feature} needs the lab extra ({', '.join(absent)} not installed): {LAB_INSTALL}")
