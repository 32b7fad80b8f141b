"""The ``adacorr`` command: inspect (and, with the reference models, demo/bench/export)."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from typing import Any, Callable, Sequence

import torch

from .cli_export import parse_option

logger = logging.getLogger("adacorr_compile")


class CliError(Exception):
    """A one-line error of the ``adacorr`` command: printed with the usage, exit code 2."""


def _load_factory(spec: str) -> Callable[[], tuple[torch.nn.Module, Callable[..., dict[str, Any]]]]:
    """The ``--model`` factory: a tiny family's, or ``package.module:factory``'s wrapped so
    that each way it can fail (no such module or attribute, not callable, it raises, it
    returns something else than ``(model, inputs)``) is one line naming the problem."""
    from .tiny import ALL_FAMILIES

    if spec in ALL_FAMILIES:
        return ALL_FAMILIES[spec][0]
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


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile a model with the adacorr backend, run one step, print what the passes found."""
    from .config import AdaCorrConfig
    from .report import format_report, report

    factory = _load_factory(args.model)
    model, inputs = factory()
    options = {"lowering": "eager", "dump_graphs": args.dump_graphs, **dict(args.option)}
    AdaCorrConfig.from_options(options)
    compiled = torch.compile(model, backend="adacorr", options=options)
    with torch.no_grad():
        compiled(**inputs(0, 500.0))
    print(format_report(report(compiled)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adacorr", description="AdaCorrection cache-guarded torch.compile backend")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the guarded regions the backend finds in a model")
    p.add_argument("--model", default="dit", help="a tiny config (dit, pixart, sd3, flux, sana, hunyuan_dit, cogvideox, wan, hunyuan_video, ltx_video, plain, nested_region) or package.module:factory "
                   "(a function returning (model, inputs) with inputs(step, t) -> forward kwargs)")
    p.add_argument("--dump-graphs", action="store_true", help="log the FX graph before and after each pass")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="a backend option, repeatable (e.g. --option scope=step shows each region's part in the decision)")
    p.set_defaults(func=cmd_inspect)
    for extra in ("demo", "export"):
        importlib.import_module(f".cli_{extra}", __package__).add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if (args.verbose or getattr(args, "dump_graphs", False)) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, CliError) as exc:  # a bad option, input or --model: the message names it
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
