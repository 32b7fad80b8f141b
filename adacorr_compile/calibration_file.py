"""calibration_file: a calibration result as a JSON file, and the options read back from one.

:func:`write` records what :func:`adacorr_compile.calibrate.calibrate` measured and chose (the
chosen options, target, rule, the whole table, the command and environment) and, with
``plot``, the Pareto plot beside it (the lab's :func:`adacorr_compile.lab.plots.pareto_plot`:
matplotlib, the ``lab`` extra). :func:`load_options` reads the options back for
``torch.compile(model, backend="adacorr", options=...)``; it needs torch alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .config import AdaCorrConfig
from .extras import require_lab

if TYPE_CHECKING:
    from .calibrate import CalibrationResult

logger = logging.getLogger("adacorr_compile")

FORMAT = "adacorr-calibration/1"


def _options_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON keeps them: an infinite number (``forecast_max_change=inf``) as the string
    ``"inf"`` (JSON has no infinity; :func:`load_options` reads it back as ``float("inf")``)."""
    return {k: ("inf" if v == math.inf else "-inf" if v == -math.inf else v) if isinstance(v, float) else v
            for k, v in options.items()}


def _json_safe(value: Any) -> Any:
    """Non-finite floats as null (JSON has no Infinity): an infinite PSNR means identical outputs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _environment() -> dict[str, Any]:
    from . import __version__

    return {
        "adacorr_compile": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }


def write(result: CalibrationResult, path: str | Path, command: str | None = None, plot: bool = True) -> Path:
    """Write ``result`` as JSON to ``path`` and, with ``plot``, the Pareto plot beside it
    (same name, ``.png``); returns the JSON path. :func:`load_options` reads the JSON back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "options": _options_json(result.options),
        "target_psnr": result.target_psnr if result.target_speed is None else None,
        "target_speed": result.target_speed,
        "speed_measure": result.speed_measure,
        "rule": result.rule,
        "met": result.met,
        "chosen": result.chosen["setting"] if result.chosen is not None else None,
        "seeds": result.seeds,
        "uncached": result.uncached,
        "base_options": _options_json(result.base_options),
        "compiles_in_sweep": result.compiles_in_sweep,
        "seconds": result.seconds,
        "table": [{**row, "options": _options_json(row["options"])} if "options" in row else row for row in result.table],
        "command": command if command is not None else " ".join(sys.argv),
        "environment": _environment(),
        "notes": ("psnr_* in dB against the uncached outputs of the same seeds (null: identical); speedup: median "
                  "of per-pair ratios uncached/cached, timed interleaved in one process; speed_fitted: the speed from one cost "
                  "model (time linear in the share of blocks computed) fitted to every pair of the table"),
    }
    path.write_text(json.dumps(_json_safe(doc), indent=2))
    result.paths["json"] = str(path)
    if plot:
        require_lab("the calibration plot (plot=True; plot=False writes the JSON alone)", ("matplotlib", "numpy"))
        from .lab.plots import pareto_plot

        png = path.with_suffix(".png")
        pareto_plot(result, png)
        result.paths["plot"] = str(png)
    logger.info("calibrate: wrote %s", ", ".join(result.paths.values()))
    return path


def load_options(path: str | Path) -> dict[str, Any]:
    """The backend options in a calibration file (``adacorr calibrate --out``; a JSON object
    whose ``"options"`` holds them, or a plain JSON object of options), validated with
    :meth:`AdaCorrConfig.from_options`; a missing file, bad JSON or a bad option is a
    ``ValueError`` naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"adacorr options file {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"adacorr options file {str(path)!r}: not JSON ({exc})") from None
    if isinstance(doc, dict) and "format" in doc:
        options = doc.get("options")
    else:
        options = doc
    if not isinstance(options, dict):
        raise ValueError(f"adacorr options file {str(path)!r}: expected a JSON object of options (or a calibration "
                         f"file with an 'options' object), got {type(options).__name__}")
    numeric = {f.name for f in dataclasses.fields(AdaCorrConfig) if isinstance(f.default, float)}
    options = {k: float(v) if k in numeric and v in ("inf", "-inf") else v for k, v in options.items()}  # _options_json
    try:
        AdaCorrConfig.from_options(options)
    except ValueError as exc:
        raise ValueError(f"adacorr options file {str(path)!r}: {exc}") from None
    return options
