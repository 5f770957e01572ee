"""The ``openqpm`` command line: the only module that reads argv, prints and picks paths/devices."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openqpm

_STAGE_COMMANDS = {
    "dense": ("dense",),
    "features": ("features",),
    "finetune": ("finetune",),
}


class _CliError(Exception):
    """An error the CLI reports in one line and exits 2 with."""


# ----------------------------------------------------------------------------- progress


class _ConsoleReporter:
    """Draws the pipeline's progress on stderr with tqdm bars and one-line solver status."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet or not _is_rank_zero()
        self._bar: Any = None
        self._bar_key: tuple[str, int] | None = None
        self._last_solver_print = 0.0

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None

    def stage_started(self, stage: str, description: str) -> None:
        self._close_bar()
        if not self.quiet:
            print(f"[{stage}] {description}", file=sys.stderr, flush=True)

    def stage_skipped(self, stage: str, reason: str) -> None:
        if not self.quiet:
            print(f"[{stage}] {reason}", file=sys.stderr, flush=True)

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        self._close_bar()
        if not self.quiet:
            shown = ", ".join(f"{k}={_short(v)}" for k, v in summary.items())
            print(f"[{stage}] done: {shown}", file=sys.stderr, flush=True)

    def training_progress(self, stage: str, event: Any) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        epoch = int(getattr(event, "epoch", 0))
        n_epochs = getattr(event, "n_epochs", None)
        n_steps = int(getattr(event, "n_steps", 0) or 0)
        step = int(getattr(event, "step", 0) or 0)
        key = (stage, epoch)
        if self._bar_key != key:
            self._close_bar()
            label = f"{stage} epoch {epoch}" + (f"/{n_epochs}" if n_epochs else "")
            self._bar = tqdm(total=n_steps or None, desc=label, unit="batch", leave=True)
            self._bar_key = key
        postfix = {}
        for name in ("loss", "accuracy", "lr"):
            value = getattr(event, name, None)
            if isinstance(value, (int, float)):
                postfix[name] = f"{value:.4g}"
        eta = getattr(event, "eta_s", None)
        if isinstance(eta, (int, float)):
            postfix["run left"] = _duration(eta)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.n = step
        self._bar.refresh()

    def pass_progress(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        key = (stage, -1)
        if self._bar_key != key:
            self._close_bar()
            self._bar = tqdm(total=total or None, desc=stage, unit="batch")
            self._bar_key = key
        self._bar.n = done
        self._bar.refresh()

    def solver_progress(self, event: Any) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last_solver_print < 0.5 and not getattr(event, "message", ""):
            return
        self._last_solver_print = now
        print("  " + _solver_line(event), file=sys.stderr, flush=True)


def _solver_line(event: Any) -> str:
    objective = getattr(event, "objective", None)
    bound = getattr(event, "bound", None)
    gap = getattr(event, "gap", None)
    elapsed = float(getattr(event, "elapsed_s", 0.0))
    parts = [f"{elapsed:7.1f}s", f"best {objective:.4f}" if objective is not None else "best -"]
    parts.append(f"bound {bound:.4f}" if bound is not None else "bound -")
    parts.append(f"gap {100 * gap:.3f}%" if gap is not None else "gap -")
    message = getattr(event, "message", "")
    if message:
        parts.append(str(message))
    return "  ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------- shared options


def _add_run_options(parser: argparse.ArgumentParser, *, require_run_dir: bool = True) -> None:
    group = parser.add_argument_group("run settings (each also a --set key)")
    group.add_argument("--config", type=Path, help="YAML config whose sections override defaults")
    group.add_argument("--run-dir", type=Path, required=require_run_dir, help="run directory")
    group.add_argument(
        "--dataset",
        choices=[
            "cub",
            "travelingbirds",
            "cars",
            "aircraft",
            "imagenet",
            "imagefolder",
            "synthetic",
        ],
        help="data set layout (data.dataset)",
    )
    group.add_argument("--data-root", help="data set folder (data.root)")
    group.add_argument("--arch", help="backbone name (model.arch)")
    group.add_argument("--weights", help="local pretrained weights file (model.weights)")
    group.add_argument("--image-size", type=int, help="input side in px (data.image_size_px)")
    group.add_argument("--n-features", type=int, help="features to select (solver.n_features)")
    group.add_argument("--n-per-class", type=int, help="features per class (solver.n_per_class)")
    group.add_argument("--epochs-dense", type=int, help="dense training epochs (dense.epochs)")
    group.add_argument("--epochs-finetune", type=int, help="fine-tuning epochs (finetune.epochs)")
    group.add_argument("--batch-size", type=int, help="batch size per process (data.batch_size)")
    group.add_argument("--seed", type=int, help="seed (seed)")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (device)")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted training from its last epoch checkpoint",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set solver.time_limit_s=120 (repeatable)",
    )


_FLAG_KEYS = {
    "dataset": "data.dataset",
    "data_root": "data.root",
    "arch": "model.arch",
    "weights": "model.weights",
    "image_size": "data.image_size_px",
    "n_features": "solver.n_features",
    "n_per_class": "solver.n_per_class",
    "epochs_dense": "dense.epochs",
    "epochs_finetune": "finetune.epochs",
    "batch_size": "data.batch_size",
    "seed": "seed",
    "device": "device",
}


def _resolve_config(args: argparse.Namespace) -> Any:
    from openqpm.config import load_config

    overrides = []
    for attribute, key in _FLAG_KEYS.items():
        value = getattr(args, attribute, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    overrides.extend(args.overrides)
    config_path = args.config
    base = None
    run_config = args.run_dir / "config.yaml" if args.run_dir else None
    if config_path is None and run_config is not None and run_config.is_file():
        # A stage command on an existing run continues with that run's configuration.
        base = load_config(run_config)
    return load_config(config_path, base=base, overrides=overrides)


def _pick_device(name: str) -> Any:
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _CliError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _set_threads(requested: int | None) -> None:
    """Choose torch's CPU thread count: the request, else the cores left idle by other work.

    PyTorch's thread team spins while it waits for its slowest thread; on a machine whose cores
    are busy with other processes, two threads can be ten times slower than one (measured on a
    loaded 2-core machine: 1.25 s against 0.08 s per demo step). So by default we leave busy
    cores alone.
    """
    import torch

    if requested is not None:
        if requested < 1:
            raise _CliError(f"--threads must be at least 1, got {requested}")
        torch.set_num_threads(requested)
        return
    n_cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return
    idle = max(1, min(torch.get_num_threads(), n_cores - int(busy + 0.5)))
    torch.set_num_threads(idle)


def _init_distributed(device: Any) -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def _run_stages(args: argparse.Namespace, stages: Sequence[str]) -> int:
    from openqpm.pipeline import run_pipeline

    config = _resolve_config(args)
    device = _pick_device(config.device)
    _init_distributed(device)
    reporter = _ConsoleReporter()
    started = time.perf_counter()
    summaries = run_pipeline(
        config, args.run_dir, device=device, stages=stages, resume=args.resume, reporter=reporter
    )
    if _is_rank_zero():
        _print_summary(args.run_dir, summaries, time.perf_counter() - started)
    return 0


def _print_summary(run_dir: Path, summaries: dict[str, Any], elapsed_s: float) -> None:
    print(f"\nRun directory: {run_dir}")
    for stage, summary in summaries.items():
        shown = ", ".join(f"{k}={_short(v)}" for k, v in summary.items())
        print(f"  {stage:<10} {shown}")
    metrics_path = run_dir / "metrics.json"
    if "evaluate" in summaries and metrics_path.is_file():
        from openqpm.metrics import format_metrics_table

        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        print()
        print(format_metrics_table(metrics.get("dense"), metrics.get("qpm")))
        baseline = metrics.get("baseline_top_weights")
        if baseline:
            print(f"\nBaseline ({baseline['description']}): {baseline['accuracy']:.2f}% accuracy")
    report = run_dir / "report" / "index.html"
    if "report" in summaries and report.is_file():
        print(f"\nReport: {report.resolve()}")
    print(f"Total time: {_duration(elapsed_s)}")


# ----------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    from openqpm.pipeline import STAGES

    return _run_stages(args, STAGES)


def _cmd_stage(args: argparse.Namespace) -> int:
    return _run_stages(args, _STAGE_COMMANDS[args.command])


def _cmd_solve(args: argparse.Namespace) -> int:
    if args.problem is None:
        if args.run_dir is None:
            raise _CliError("openqpm solve: give a problem.npz file or --run-dir")
        return _run_stages(args, ("problem", "assignment"))
    from openqpm.solver import AssignmentProblem, solve

    reporter = _ConsoleReporter()
    problem = AssignmentProblem.load(args.problem)
    method = args.method or "auto"
    time_limit_s = args.time_limit if args.time_limit is not None else 60.0
    print(
        f"Solving {args.problem}: {problem.A.shape[0]} classes, {problem.A.shape[1]} features, "
        f"select {problem.n_features}, {problem.n_per_class} per class; method {method}, "
        f"limit {time_limit_s:g}s",
        file=sys.stderr,
    )
    assignment = solve(
        problem,
        method=method,
        time_limit_s=time_limit_s,
        seed=args.seed if args.seed is not None else 0,
        progress=reporter.solver_progress,
    )
    out = args.out or args.problem.with_name("assignment.json")
    assignment.save(out)
    gap = f"{100 * assignment.gap:.3f}%" if assignment.gap is not None else "unknown"
    bound = f"{assignment.bound:.4f}" if assignment.bound is not None else "none"
    print(
        f"objective {assignment.objective:.4f}  bound {bound}  gap {gap}  "
        f"method {assignment.method}  time {assignment.time_s:.1f}s\nwrote {out}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    args.run_dir = args.run_dir_positional
    args.config = None
    args.overrides = list(args.overrides)
    for attribute in _FLAG_KEYS:
        setattr(args, attribute, getattr(args, attribute, None))
    args.resume = True
    return _run_stages(args, (args.command,))


def _cmd_demo(args: argparse.Namespace) -> int:
    from openqpm.config import apply_overrides, demo_config, with_overrides
    from openqpm.data.synthetic import make_synthetic

    run_dir: Path = args.run_dir
    data_dir = run_dir / "data"
    started = time.perf_counter()
    marker = data_dir / "openqpm_synthetic.json"
    if marker.is_file():
        print(f"[data] reusing the embedded data set in {data_dir}", file=sys.stderr)
    else:
        print(f"[data] generating the embedded data set in {data_dir}", file=sys.stderr)
        make_synthetic(
            data_dir,
            n_classes=args.classes,
            n_images_per_class=args.images_per_class,
            image_size_px=64,
            seed=args.seed,
        )
    config = with_overrides(demo_config(), data={"root": str(data_dir)})
    config = apply_overrides(config, [f"seed={args.seed}", *args.overrides])
    from openqpm.pipeline import STAGES, run_pipeline

    device = _pick_device(config.device)
    summaries = run_pipeline(
        config, run_dir, device=device, stages=STAGES, resume=True, reporter=_ConsoleReporter()
    )
    _print_summary(run_dir, summaries, time.perf_counter() - started)
    print(
        "\nNext: open the report in a browser, or train on your own data with\n"
        "  openqpm train --config configs/cub_resnet50.yaml --data-root PATH --run-dir runs/cub"
    )
    return 0


def _cmd_data_make_synthetic(args: argparse.Namespace) -> int:
    from openqpm.data.synthetic import make_synthetic, render_preview

    started = time.perf_counter()
    root = make_synthetic(
        args.out_dir,
        n_classes=args.classes,
        n_images_per_class=args.images_per_class,
        image_size_px=args.size,
        seed=args.seed,
        correlated_backgrounds=args.correlated_backgrounds,
    )
    print(f"wrote {root} in {time.perf_counter() - started:.1f}s")
    if args.preview is not None:
        print(f"preview: {render_preview(root, args.preview)}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from openqpm.data import check_dataset, detect_dataset
    from openqpm.data._base import DatasetError

    try:
        name = args.dataset or detect_dataset(args.path)
        problems = check_dataset(args.path, name, image_check=args.image_check)
    except DatasetError as error:
        print(f"{args.path}: {error}")
        return 1
    if problems:
        print(f"{args.path} ({name}): {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"{args.path}: usable as {name}")
    return 0


# ----------------------------------------------------------------------------- parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openqpm",
        description=(
            "Train globally interpretable image classifiers with QPM: every class is a short "
            "list of features chosen by a quadratic program."
        ),
    )
    parser.add_argument("--version", action="version", version=f"openqpm {openqpm.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: the cores not busy with other work)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="generate the embedded data set and train a QPM on it end to end (CPU)"
    )
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="run directory")
    demo.add_argument("--classes", type=int, default=50, help="classes of the embedded data set")
    demo.add_argument("--images-per-class", type=int, default=None, help="images per class")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(handler=_cmd_demo)

    train = commands.add_parser("train", help="run every stage: dense, features, solve, ...")
    _add_run_options(train)
    train.set_defaults(handler=_cmd_train)

    for name, text in (
        ("dense", "train the dense model"),
        ("features", "compute the training-set feature statistics"),
        ("finetune", "fine-tune with the assignment fixed"),
    ):
        sub = commands.add_parser(name, help=text)
        _add_run_options(sub)
        sub.set_defaults(handler=_cmd_stage)

    solve = commands.add_parser(
        "solve",
        help="solve an assignment problem (problem.npz), or the problem of a run directory",
    )
    solve.add_argument("problem", type=Path, nargs="?", help="problem.npz (A, R, b, sizes)")
    solve.add_argument("--time-limit", type=float, help="seconds (default 60)")
    solve.add_argument("--out", type=Path, help="assignment.json to write")
    solve.add_argument("--method", help="auto, search, milp, paper, gurobi or scip")
    _add_run_options(solve, require_run_dir=False)
    solve.set_defaults(handler=_cmd_solve)

    for name, text in (
        ("evaluate", "compute every metric of the run's dense and QPM models"),
        ("report", "write the run's HTML report"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("run_dir_positional", type=Path, metavar="RUN_DIR")
        sub.add_argument("--device", help="auto, cpu, cuda or cuda:N")
        sub.add_argument("--set", dest="overrides", action="append", default=[])
        sub.set_defaults(handler=_cmd_evaluate)

    data = commands.add_parser("data", help="make or check data sets")
    data_commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    make = data_commands.add_parser(
        "make-synthetic", help="generate the embedded part-based data set (CUB layout)"
    )
    make.add_argument("out_dir", type=Path)
    make.add_argument("--classes", type=int, default=50)
    make.add_argument("--images-per-class", type=int, default=None)
    make.add_argument("--size", type=int, default=64, help="image side in px")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument(
        "--correlated-backgrounds",
        action="store_true",
        help="class-correlated backgrounds in the training split (TravelingBirds idea)",
    )
    make.add_argument("--preview", type=Path, help="also write a PNG grid of examples per class")
    make.set_defaults(handler=_cmd_data_make_synthetic)
    check = data_commands.add_parser("check", help="validate a data set folder")
    check.add_argument("path", type=Path)
    check.add_argument("--dataset", help="layout name; detected when omitted")
    check.add_argument(
        "--image-check",
        choices=["auto", "full", "sample", "none"],
        default="auto",
        help="decode every image (full), a spread sample, or none; auto: full up to 20000 images",
    )
    check.set_defaults(handler=_cmd_data_check)
    data.set_defaults(handler=None, parser=data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler = getattr(args, "handler", None)
    if args.command is None or handler is None:
        (getattr(args, "parser", None) or parser).print_help()
        return 0
    from openqpm.config import ConfigError

    try:
        if args.command in {"demo", "train", "dense", "features", "finetune", "evaluate", "report"}:
            _set_threads(args.threads)
        return int(handler(args))
    except _CliError as error:
        print(f"openqpm: error: {error}", file=sys.stderr)
        return 2
    except ConfigError as error:
        print(f"openqpm: config error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nopenqpm: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    except Exception as error:
        # Known, explained failures (bad data, bad input) become one clear line; anything else
        # keeps its traceback so that it can be reported.
        from openqpm.data._base import DatasetError
        from openqpm.pipeline import PipelineError
        from openqpm.training import TrainingDivergedError

        explained: tuple[type[BaseException], ...] = (
            PipelineError,
            DatasetError,
            TrainingDivergedError,
            FileNotFoundError,
        )
        if isinstance(error, explained):
            print(f"openqpm: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
