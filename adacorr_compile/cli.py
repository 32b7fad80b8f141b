"""The ``adacorr`` command: inspect, demo, export, calibrate and serve."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

import torch

from .cli_common import CliError, load_factory, parse_option
from .extras import LabMissing

logger = logging.getLogger("adacorr_compile")


def cmd_inspect(args: argparse.Namespace) -> int:
    """Compile a model with the adacorr backend, run one step, print what the passes found."""
    from .config import AdaCorrConfig
    from .report import format_report, report

    factory = load_factory(args.model)
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
    # the subcommands' modules, imported here (not at the top): demo is the lab's (adacorr_compile.lab),
    # whose packages are checked when it runs, so that `adacorr --help` works with the core alone
    for module in (".lab.demo", ".cli_export", ".cli_calibrate", ".cli_serve"):
        importlib.import_module(module, __package__).add_parser(sub)
    try:
        args = parser.parse_args(argv)
    except LabMissing as exc:  # an argument whose check needs the lab (demo --guidance)
        parser.error(str(exc))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for the files it writes
    logging.basicConfig(level=logging.INFO if (args.verbose or getattr(args, "dump_graphs", False)) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, CliError, LabMissing) as exc:  # a bad option, input or --model, or the lab extra missing
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
