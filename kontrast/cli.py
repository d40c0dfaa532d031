"""The `kontrast` command: validate, train, evaluate and launch TrainJobs; submit and follow them in a cluster.

Subcommands import their heavy dependencies lazily, so `kontrast validate` works in an
environment without torch (the operator image) or the kubernetes package, and starts fast
everywhere.

Exit codes of `submit`, `watch` and `logs` (EXIT_* below; the README lists them too):
0 the TrainJob Succeeded (or, without --watch, was created), 1 it Failed, 2 bad command-line
usage, 3 the TrainJob file is invalid (nothing was sent), 4 the API server refused a request
or could not be reached (its message is printed), 5 the TrainJob was deleted while watched,
6 --timeout passed before it finished, 130 interrupted (Ctrl-C; the TrainJob keeps running).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from . import __version__

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_API = 4
EXIT_DELETED = 5
EXIT_TIMEOUT = 6
EXIT_INTERRUPTED = 130


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


def _client(args: argparse.Namespace):
    from .client import Client

    return Client(args.namespace, context=args.context)


def _follow(client, name: str, namespace: str | None, timeout: float | None) -> int:
    """Print a TrainJob's changes until it finishes; the exit code says how it ended."""
    from .client import ClientError, Follower, Printer, TrainJobDeleted, WaitTimeout

    printer = Printer(sys.stdout, sys.stderr)
    follower = Follower()
    ns = namespace or client.namespace
    last = None
    try:
        for snap in client.stream(name, ns, timeout=timeout):
            if last is None:
                printer.line(f"TrainJob {ns}/{name}")
            last = snap
            printer.events(follower.update(snap))
    except WaitTimeout as exc:
        printer.end_progress()
        print(f"kontrast: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except TrainJobDeleted as exc:
        printer.end_progress()
        print(f"kontrast: {exc}", file=sys.stderr)
        return EXIT_DELETED
    except ClientError as exc:
        printer.end_progress()
        print(f"kontrast: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        printer.end_progress()
        print(f"kontrast: interrupted; the TrainJob keeps running (kontrast watch {name} -n {ns})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_SUCCEEDED if last is not None and last.succeeded else EXIT_FAILED


def _submit(args: argparse.Namespace) -> int:
    from .api import TrainJobInvalid
    from .client import ClientError, read_documents

    try:
        read_documents(args.file)  # local validation first: nothing is sent for an invalid file
    except TrainJobInvalid as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    try:
        client = _client(args)
        created = client.create(args.file, namespace=args.namespace)
    except TrainJobInvalid as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except ClientError as exc:
        print(f"kontrast submit: {args.file}: {exc}", file=sys.stderr)
        return EXIT_API
    print(f"trainjob.kontrast.dev/{created.name} created in namespace {created.namespace}", flush=True)
    if not args.watch:
        return EXIT_SUCCEEDED
    return _follow(client, created.name, created.namespace, args.timeout)


def _watch(args: argparse.Namespace) -> int:
    from .client import ClientError

    try:
        client = _client(args)
    except ClientError as exc:
        print(f"kontrast watch: {exc}", file=sys.stderr)
        return EXIT_API
    return _follow(client, args.name, args.namespace, args.timeout)


def _logs(args: argparse.Namespace) -> int:
    from .client import ClientError, NoWorkerPod
    from .client.pods import attempt_of

    try:
        client = _client(args)
        pod = client.worker_pod(args.name, args.worker, args.namespace, args.attempt)
        print(f"==> pod {pod['metadata']['name']} (attempt {attempt_of(pod)}, worker {args.worker})",
              file=sys.stderr, flush=True)
        if not (pod.get("spec") or {}).get("nodeName"):
            phase = (pod.get("status") or {}).get("phase") or "Pending"
            print(f"kontrast logs: pod {pod['metadata']['name']} is {phase} and not on a node yet: no log so far",
                  file=sys.stderr, flush=True)
        for chunk in client.logs(args.name, args.worker, args.namespace, follow=args.follow,
                                 tail_lines=args.tail, pod=pod):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except NoWorkerPod as exc:
        print(f"kontrast logs: {exc}", file=sys.stderr)
        return EXIT_API
    except ClientError as exc:
        print(f"kontrast logs: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def _cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="default: the kube context's namespace")
    p.add_argument("--context", help="the kubeconfig context to use (default: the current one)")


def _parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser("submit", help="create a TrainJob in the current kube context (validated first)",
                       description="Validate a TrainJob file as `kontrast validate` does, then create it "
                                   "(and the file's other objects that do not exist yet, such as a "
                                   "PersistentVolumeClaim). Exit codes: 0 created (with --watch: "
                                   "Succeeded), 1 Failed, 3 invalid file, 4 refused by the API server, "
                                   "5 deleted while watched, 6 --timeout passed, 130 interrupted.")
    p.add_argument("file")
    p.add_argument("-w", "--watch", action="store_true", help="then follow it as `kontrast watch` does")
    p.add_argument("--timeout", type=float, help="with --watch: give up after this many seconds (exit 6)")
    _cluster_options(p)

    p = sub.add_parser("watch", help="follow a TrainJob: progress, conditions, metrics; exit code says how it ended",
                       description="Follow a TrainJob with a watch until it finishes. Exit codes: "
                                   "0 Succeeded, 1 Failed, 4 not found or refused by the API server, "
                                   "5 deleted while watched, 6 --timeout passed, 130 interrupted.")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 6)")
    _cluster_options(p)

    p = sub.add_parser("logs", help="show the log of a TrainJob worker pod (the newest attempt)")
    p.add_argument("name")
    p.add_argument("--worker", type=int, default=0, help="the worker (node) index (default 0: rank 0's pod)")
    p.add_argument("--attempt", type=int, help="an older attempt's pod (default: the newest)")
    p.add_argument("-f", "--follow", action="store_true", help="follow the log until the container ends")
    p.add_argument("--tail", type=int, help="only the last N lines")
    _cluster_options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # train, evaluate and launch pass the rest on (the trainer's own flags, torchrun's).
    passes_rest = {"train": _train, "evaluate": _evaluate, "launch": _launch}
    if args.command in passes_rest:
        return passes_rest[args.command](args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    own = {"validate": _validate, "export": _export, "report": _report, "submit": _submit, "watch": _watch,
           "logs": _logs}
    return own[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
