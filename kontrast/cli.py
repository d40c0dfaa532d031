"""The `kontrast` command: validate, train, evaluate and launch TrainJobs.

Subcommands import their heavy dependencies lazily, so `kontrast validate` works in an
environment without torch (the operator image) and starts fast everywhere.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from . import __version__


def _validate(args: argparse.Namespace) -> int:
    from .api import TrainJobInvalid, load_trainjob

    try:
        obj = load_trainjob(args.file)
    except TrainJobInvalid as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.show_defaults:
        yaml.safe_dump(obj, sys.stdout, sort_keys=False)
    else:
        print(f"{args.file}: valid TrainJob")
    return 0


def _train(args: argparse.Namespace, rest: list[str]) -> int:
    from .trainer.cli.train import main as train_main

    return train_main([args.file, *rest] if args.file else rest)


def _evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from .trainer.cli.evaluate import main as evaluate_main

    return evaluate_main([args.file, *rest] if args.file else rest)


def _launch(args: argparse.Namespace, rest: list[str]) -> int:
    from .trainer.cli.launch import main as launch_main

    return launch_main([args.file, *rest] if args.file else rest)


def _export(args: argparse.Namespace) -> int:
    from .trainer.ship.export import export_checkpoint

    try:
        export_checkpoint(args.checkpoint, args.out)
    except (OSError, ValueError) as exc:
        print(f"kontrast export: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: open_clip model folder (load it with open_clip's \"local-dir:{args.out}\")")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .trainer.ship.report_page import write_report

    try:
        written = write_report(args.output)
    except (OSError, ValueError) as exc:
        print(f"kontrast report: {exc}", file=sys.stderr)
        return 1
    for location in written:
        print(location)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kontrast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kontrast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate a TrainJob file against the CRD schema and rules")
    p.add_argument("file")
    p.add_argument("--show-defaults", action="store_true",
                   help="print the TrainJob with defaults applied exactly as the API server would")

    p = sub.add_parser("train", help="train locally from a TrainJob file (no cluster needed)",
                       add_help=False)
    p.add_argument("file", nargs="?")

    p = sub.add_parser("evaluate", help="evaluate the TrainJob's starting model or a checkpoint on its evalData",
                       add_help=False)
    p.add_argument("file", nargs="?")

    p = sub.add_parser("launch", help="run torchrun for one node of a TrainJob (used inside pods)",
                       add_help=False)
    p.add_argument("file", nargs="?")

    p = sub.add_parser("export", help="export a training checkpoint as an open_clip model folder")
    p.add_argument("checkpoint", help="a checkpoint of a run (<output>/checkpoints/epoch_N.pt)")
    p.add_argument("out", help="the folder to write (a path or an fsspec URL)")
    p.add_argument("--format", choices=["open_clip"], default="open_clip",
                   help="open_clip: open_clip_config.json + open_clip_model.safetensors (the Hub layout)")

    p = sub.add_parser("report", help="(re)write report.html and the PNG plots of a run's output folder")
    p.add_argument("output", help="the run's output folder (finished or in progress)")

    args, rest = parser.parse_known_args(argv)
    if args.command in ("export", "report") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "export":
        return _export(args)
    if args.command == "report":
        return _report(args)
    if args.command == "validate":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _validate(args)
    if args.command == "train":
        return _train(args, rest)
    if args.command == "evaluate":
        return _evaluate(args, rest)
    return _launch(args, rest)


if __name__ == "__main__":
    sys.exit(main())
