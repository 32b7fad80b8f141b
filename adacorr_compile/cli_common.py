"""cli_common: what the ``adacorr`` subcommands share.

:class:`CliError` (a one-line error: usage, exit code 2), :func:`load_factory` (the
``--model`` factory) and :func:`parse_option` (``--option KEY=VALUE``). The command
itself (:mod:`adacorr_compile.cli`) and its ``demo``, ``export`` and ``calibrate`` subcommands
(:mod:`adacorr_compile.lab.demo`, :mod:`adacorr_compile.cli_export`,
:mod:`adacorr_compile.cli_calibrate`) import them from here, so that ``cli`` and its
subcommand modules do not import each other. The tiny families (``--model dit``, ...) are the
lab's (:mod:`adacorr_compile.lab.tiny`), imported when a command runs; a family whose package
(diffusers) is missing is a one-line error naming the ``lab`` extra.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
from typing import Any, Callable

import torch

from .extras import LAB_PACKAGES, require_lab


class CliError(Exception):
    """A one-line error of the ``adacorr`` command: printed with the usage, exit code 2."""


def load_factory(spec: str) -> Callable[[], tuple[torch.nn.Module, Callable[..., dict[str, Any]]]]:
    """The ``--model`` factory: a tiny family's, or ``package.module:factory``'s wrapped so
    that each way it can fail (no such module or attribute, not callable, it raises, it
    returns something else than ``(model, inputs)``) is one line naming the problem."""
    from .lab.tiny import ALL_FAMILIES  # torch alone at import; a family's diffusers loads when it is built

    if spec in ALL_FAMILIES:
        return _lab_family(spec, ALL_FAMILIES[spec][0])
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise CliError(f"--model {spec!r}: expected one of {', '.join(ALL_FAMILIES)} or 'package.module:factory'")
    try:
        module = importlib.import_module(mod)
    except ImportError as exc:
        raise CliError(f"--model {spec!r}: cannot import module {mod!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the module's own code failed on import
        raise CliError(f"--model {spec!r}: importing {mod!r} raised {type(exc).__name__}: {exc}") from None
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        raise CliError(f"--model {spec!r}: module {mod!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise CliError(f"--model {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable factory")

    def checked() -> tuple[torch.nn.Module, Callable[..., dict[str, Any]]]:
        try:
            made = factory()
        except Exception as exc:  # noqa: BLE001 - the user's factory: say which and what it raised
            raise CliError(f"--model {spec!r}: the factory raised {type(exc).__name__}: {exc}") from None
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module) and callable(made[1])):
            got = (f"({', '.join(type(x).__name__ for x in made)})" if isinstance(made, tuple) else type(made).__name__)
            raise CliError(f"--model {spec!r}: the factory returned {got}; expected (model, inputs): an nn.Module and a "
                           "callable inputs(step, t) -> forward kwargs")
        return made

    return checked


def _lab_family(spec: str, make: Callable[[], Any]) -> Callable[[], Any]:
    """A tiny family's factory whose missing lab package (diffusers) is a :class:`LabMissing`
    naming the family and the ``lab`` extra, not a traceback."""

    def checked() -> Any:
        try:
            return make()
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] not in LAB_PACKAGES:
                raise
            require_lab(f"--model {spec}", [exc.name.partition(".")[0]])
            raise

    return checked


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``; the value is a Python literal if it parses as one
    (``0.1``, ``3``, ``True``), ``true``/``false`` are booleans, ``inf`` is ``float("inf")``,
    anything else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected key=value")
    key, _, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    if raw.lower() in ("inf", "+inf", "infinity"):  # e.g. forecast_max_change=inf
        return key, float("inf")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def speed_factor(text: str) -> float:
    """A speed target: a finite number > 1 (times faster than uncached)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a speed factor > 1 (e.g. 2.5), got {text!r}") from None
    if not value > 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a speed factor > 1 (e.g. 2.5), got {text}")
    return value
