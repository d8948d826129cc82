"""The command line: ``python -m or_core pretrain ...``, ``python -m or_core evaluate DIR``,
``python -m or_core matrix configs/matrix_cpu.yaml`` and ``python -m or_core transfer DIR --dataset dtd``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

from or_core.config import PROFILES, PretrainConfig, resolve_config
from or_core.errors import input_error_message
from or_core.fast_path.compiled_calls import COMPILE_MODES
from or_core.methods import METHODS, REGULARIZERS, available_methods

DATASETS = "cifar10, cifar100, or a path to an ImageFolder root with train/ and val/ (or test/)"
#: ``evaluate``'s flags: the evaluation sizes of the run's config, overridden (clipped to the data).
EVALUATION_FLAGS = {
    "--eval-train-subset": "training images of the kNN bank and the linear probe's training set",
    "--eval-test-subset": "test images evaluated",
    "--val-images": "held-out training images of the validation kNN (0: none)",
    "--linear-epochs": "epochs of the linear probe",
    "--knn-k": "neighbours of the kNN classifier",
    "--knn-t": "temperature of the kNN classifier",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the usage is, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an input error (also OR_CORE_DEBUG=1)",
    )
    parser = _Parser(
        prog="python -m or_core",
        description=(
            "Self-supervised pretraining with orthogonality regularization "
            "(He, Du & Ma, NeurIPS 2024)."
        ),
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser(
        "pretrain",
        parents=[common],
        help="pretrain an encoder (resumes if --out holds the same run)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"methods: {', '.join(available_methods())}\n"
            f"regularizers: {', '.join(REGULARIZERS)}\n"
            f"data sets: {DATASETS}\n"
            f"profiles: " + "; ".join(f"{k}: {v}" for k, v in PROFILES.items()) + "\n"
            "per-method profile settings: "
            + "; ".join(
                f"{profile} {name}: {settings}"
                for name, cls in sorted(METHODS.items())
                for profile, settings in cls.profile_settings.items()
            )
        ),
    )
    p.add_argument("--method", choices=available_methods(), default=None)
    p.add_argument("--regularizer", choices=REGULARIZERS, default=None)
    p.add_argument(
        "--gamma", type=float, default=None, help="OR weight (default: SO 1e-6, SRIP 1e-3)"
    )
    p.add_argument("--dataset", default=None, help=DATASETS)
    p.add_argument(
        "--data-root", default=None, help="download / cache folder of the named data sets"
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default=None)
    p.add_argument("--config", default=None, help="YAML file of config fields (see configs/)")
    p.add_argument("--backbone", default=None, help="resnet18, resnet50, vit_tiny, vit_small, vit_base")
    p.add_argument("--width", type=float, default=None, help="ResNet width multiplier")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument(
        "--subset", type=int, default=None, help="class-balanced subset of the training set"
    )
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--optimizer", choices=("lars", "sgd", "adamw"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=None,
        choices=(True, "none", *COMPILE_MODES),
        metavar="MODE",
        help="torch.compile the backbone and its EMA copies; MODE: none, "
        + ", ".join(COMPILE_MODES)
        + " (bare --compile: default; reduce-overhead replays CUDA graphs; the gpu profile's is"
        " reduce-overhead)",
    )
    p.add_argument(
        "--compile-or", action="store_const", const=True, default=None,
        help="with --compile: compile the OR term too, in the same mode",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--stop-after-epochs", type=int, default=None,
        help="stop after this many epochs of this call; the same command later resumes",
    )
    e = sub.add_parser(
        "evaluate", parents=[common], help="kNN and linear probe of a run's last checkpoint"
    )
    e.add_argument("out", help="run directory")
    for flag, help_ in EVALUATION_FLAGS.items():
        e.add_argument(flag, type=float if flag == "--knn-t" else int, default=None, help=help_)
    m = sub.add_parser(
        "matrix",
        parents=[common],
        help="run an experiment matrix (configs/matrix_*.yaml); runs already recorded are skipped",
    )
    m.add_argument("matrix", help="matrix YAML file, e.g. configs/matrix_cpu.yaml")
    m.add_argument(
        "--work", default=None, help="run directories (default ~/.cache/or_core/matrix/<name>)"
    )
    m.add_argument("--results", default=None, help="records folder (default: the file's `results`)")
    m.add_argument(
        "--jobs", type=int, default=1, help="runs side by side, cores shared between them"
    )
    m.add_argument("--groups", nargs="+", default=None, help="only runs of these groups")
    m.add_argument("--only", nargs="+", default=None, help="only runs with these names")
    m.add_argument("--dry-run", action="store_true", help="list the pending runs and stop")
    m.add_argument(
        "--rerun", action="store_true", help="train recorded runs again, overwriting their records"
    )
    c = sub.add_parser(
        "campaign",
        parents=[common],
        help=(
            "train the next runs of a campaign (configs/campaign_gpu.yaml) that fit a time "
            "budget, one bundle each"
        ),
    )
    c.add_argument("campaign", help="campaign YAML file, e.g. configs/campaign_gpu.yaml")
    c.add_argument(
        "--budget-s", type=float, required=True,
        help="seconds this call may take: a run starts only if its expected time fits what is left",
    )
    c.add_argument(
        "--out", required=True, help="folder of the bundles, one <run>.json per finished run"
    )
    c.add_argument(
        "--results",
        default=None,
        help="records folder whose runs are skipped (default: the file's `results`)",
    )
    c.add_argument(
        "--rates", default=None,
        help=(
            "measured images/s: a rates JSON, a benchmarks/train_throughput.py JSON or a folder "
            "of records"
        ),
    )
    c.add_argument(
        "--dry-run",
        action="store_true",
        help="list what the call would run and skip; train nothing",
    )
    _add_transfer_parser(sub, common)
    return parser


def _add_transfer_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from or_core.transfer import TRANSFER_SETS

    t = sub.add_parser(
        "transfer", parents=[common],
        help="linear probe of a run's frozen encoder on a transfer data set (the paper's Table 5)",
    )
    t.add_argument("out", help="run directory (its checkpoint.pt)")
    t.add_argument("--dataset", required=True, choices=list(TRANSFER_SETS), help="transfer data set, official splits")
    t.add_argument("--data-root", default=None, help="where the data set is, or is downloaded to by torchvision")
    t.add_argument("--image-size", type=int, default=None, help="image side (default: the run's training size)")
    t.add_argument("--epochs", type=int, default=100, help="epochs of the linear probe")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    t.add_argument("--num-workers", type=int, default=0, help="image-decoding processes (0: this one)")
    t.add_argument("--no-download", action="store_true", help="use only what is under --data-root")
    t.add_argument("--record", default=None, help="record JSON file (default: RUN_DIR/transfer/DATASET.json)")


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv``; an input error is one line on stderr and exit code 2
    (with ``--debug`` or ``OR_CORE_DEBUG=1`` it raises, traceback and all)."""
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("OR_CORE_DEBUG", "") not in ("", "0")
    try:
        return _run(args, debug)
    except Exception as error:
        message = input_error_message(error)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, debug: bool) -> int:
    if args.command == "evaluate":
        from or_core.train import evaluate_dir

        names = [flag[2:].replace("-", "_") for flag in EVALUATION_FLAGS]
        sizes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
        print(json.dumps(evaluate_dir(args.out, sizes), indent=2))
        return 0
    if args.command == "matrix":
        from or_core.experiments import being_trained, run_matrix

        names = run_matrix(
            args.matrix, args.work, jobs=args.jobs, groups=args.groups, only=args.only,
            results=args.results, dry_run=args.dry_run, rerun=args.rerun, debug=debug,
        )
        if args.dry_run:  # name the runs another process is training now
            busy = being_trained(args.matrix, names, args.work)
            names = [f"{n} (being trained by process {busy[n]['pid']} on {busy[n]['host']})" if n in busy else n
                     for n in names]
        print(("pending: " if args.dry_run else "ran: ") + (", ".join(names) or "nothing"))
        return 0
    if args.command == "transfer":
        from or_core.transfer import transfer

        record = transfer(
            args.out, args.dataset, args.data_root, args.image_size, args.epochs, args.seed,
            download=not args.no_download, device=args.device, num_workers=args.num_workers, out=args.record,
        )
        print(json.dumps(record, indent=2))
        return 0
    if args.command == "campaign":
        from or_core.campaign import run_campaign

        run_campaign(
            args.campaign, args.budget_s, args.out, results=args.results, rates=args.rates,
            dry_run=args.dry_run,
        )
        return 0
    fields = {f for f in PretrainConfig.__dataclass_fields__}
    overrides = {k: v for k, v in vars(args).items() if k in fields}
    cfg = resolve_config(args.profile, args.config, overrides)
    from or_core.train import pretrain

    summary = pretrain(
        cfg, args.out, show_progress=not args.no_progress, stop_after_epochs=args.stop_after_epochs
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
