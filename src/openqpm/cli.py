"""The ``openqpm`` command line: the only module that reads argv, prints and picks paths/devices."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openqpm
from openqpm.stages import STAGES, PipelineError, Reporter, stage_names

if TYPE_CHECKING:  # pragma: no cover
    from openqpm.api import RunResult
    from openqpm.config import RunConfig
    from openqpm.solver.problem import SolverProgress
    from openqpm.training import TrainingProgress


class _CliError(Exception):
    """An error the CLI reports in one line and exits 2 with."""


# ----------------------------------------------------------------------------- progress


class _ConsoleReporter(Reporter):
    """Progress on stderr: tqdm bars on a terminal; one line per epoch (or every 30 s) in a file."""

    _LINE_EVERY_S = 30.0

    def __init__(self, *, quiet: bool = False, interactive: bool | None = None) -> None:
        self.quiet = quiet or not _is_rank_zero()
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: Any = None
        self._bar_key: tuple[str, int] | None = None
        self._last_line = time.monotonic()
        self._last_solver_print = 0.0

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None

    def _bar_for(self, key: tuple[str, int], total: int, label: str) -> Any:
        from tqdm import tqdm

        if self._bar_key != key:
            self._close_bar()
            self._bar = tqdm(total=total or None, desc=label, unit="batch", leave=True)
            self._bar_key = key
        return self._bar

    def _line_due(self, done: int, total: int) -> bool:
        """In a log file: a line at the end of a pass or epoch, else every 30 s."""
        now = time.monotonic()
        if done >= total or now - self._last_line >= self._LINE_EVERY_S:
            self._last_line = now
            return True
        return False

    def stage_started(self, stage: str, description: str) -> None:
        self._close_bar()
        self._last_line = time.monotonic()
        self._say(f"[{stage}] {description}")

    def stage_skipped(self, stage: str, reason: str) -> None:
        self._say(f"[{stage}] {reason}")

    def stage_finished(self, stage: str, summary: dict[str, Any]) -> None:
        self._close_bar()
        self._say(f"[{stage}] done: " + ", ".join(f"{k}={_short(v)}" for k, v in summary.items()))

    def training_progress(self, stage: str, event: TrainingProgress) -> None:
        if self.quiet:
            return
        values = f"loss {event.loss:.4g}, accuracy {event.accuracy:.4g}, lr {event.lr:.4g}"
        if not self.interactive:
            if self._line_due(event.step, event.n_steps):
                self._say(
                    f"[{stage}] epoch {event.epoch}/{event.n_epochs} step "
                    f"{event.step}/{event.n_steps}: {values}, run left {_duration(event.eta_s)}"
                )
            return
        label = f"{stage} epoch {event.epoch}/{event.n_epochs}"
        bar = self._bar_for((stage, event.epoch), event.n_steps, label)
        postfix = {"loss": f"{event.loss:.4g}", "accuracy": f"{event.accuracy:.4g}"}
        postfix.update({"lr": f"{event.lr:.4g}", "run left": _duration(event.eta_s)})
        bar.set_postfix(postfix, refresh=False)
        bar.n = event.step
        bar.refresh()

    def pass_progress(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self.interactive:
            if self._line_due(done, total):
                self._say(f"[{stage}] {done}/{total} batches")
            return
        bar = self._bar_for((stage, -1), total, stage)
        bar.n = done
        bar.refresh()

    def solver_progress(self, event: SolverProgress) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if now - self._last_solver_print < 0.5 and not event.message:
            return
        self._last_solver_print = now
        self._say("  " + _solver_line(event))


def _solver_line(event: SolverProgress) -> str:
    objective, bound, gap = event.objective, event.bound, event.gap
    parts = [f"{event.elapsed_s:7.1f}s"]
    parts.append(f"best {objective:.4f}" if objective is not None else "best -")
    parts.append(f"bound {bound:.4f}" if bound is not None else "bound -")
    parts.append(f"gap {100 * gap:.3f}%" if gap is not None else "gap -")
    if event.message:
        parts.append(str(event.message))
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


@dataclass(frozen=True)
class _Flag:
    """One command-line flag that sets one config field, with its value's type."""

    flag: str
    field: str
    type: Callable[[str], Any]
    help: str

    @property
    def dest(self) -> str:
        return "field:" + self.field


# The one table of flags: argparse and the overrides are both derived from it.
_FLAGS: tuple[_Flag, ...] = (
    _Flag("--dataset", "data.dataset", str, "data set layout (see `openqpm data check`)"),
    _Flag("--data-root", "data.root", str, "data set folder"),
    _Flag("--arch", "model.arch", str, "backbone name"),
    _Flag("--weights", "model.weights", str, "local pretrained weights file"),
    _Flag("--image-size", "data.image_size_px", int, "input side in px"),
    _Flag("--n-features", "solver.n_features", int, "features to select"),
    _Flag("--n-per-class", "solver.n_per_class", int, "features per class"),
    _Flag("--epochs-dense", "dense.epochs", int, "dense training epochs"),
    _Flag("--epochs-finetune", "finetune.epochs", int, "fine-tuning epochs"),
    _Flag("--batch-size", "data.batch_size", int, "batch size per process"),
    _Flag("--method", "sparsify.method", str, "qpm, chiqpm, glm-saga5, sldd or qsenn"),
    _Flag(
        "--calibration-fraction",
        "data.calibration_fraction",
        float,
        "share of the training images held out to calibrate prediction sets on (e.g. 0.1)",
    ),
    _Flag("--solver", "solver.method", str, "solver method (auto, search, milp, ...)"),
    _Flag("--time-limit", "solver.time_limit_s", float, "solver time limit in seconds"),
    _Flag("--seed", "seed", int, "seed of data order, initialisation, solver and metrics"),
    _Flag("--device", "device", str, "auto, cpu, cuda or cuda:N"),
)


# `openqpm solve` is about the solver: there --method is the solver's method.
_SOLVE_FLAGS: tuple[_Flag, ...] = tuple(
    _Flag("--method", "solver.method", str, "solver method (auto, search, milp, ...)")
    if flag.flag == "--method"
    else flag
    for flag in _FLAGS
    if flag.flag != "--solver"
)


def _add_run_options(
    parser: argparse.ArgumentParser, *, positional_run_dir: bool, flags: Sequence[_Flag] = _FLAGS
) -> None:
    parser.set_defaults(flags=tuple(flags))
    group = parser.add_argument_group("run settings (each also a --set key)")
    if positional_run_dir:
        group.add_argument("run_dir_positional", type=Path, nargs="?", metavar="RUN_DIR")
    group.add_argument(
        "--config", help="a shipped configuration's name (`openqpm configs`) or a YAML path"
    )
    group.add_argument("--run-dir", type=Path, help="run directory")
    for flag in flags:
        metavar = "N" if flag.type is int else "X" if flag.type is float else "VALUE"
        group.add_argument(
            flag.flag,
            dest=flag.dest,
            type=flag.type,
            metavar=metavar,
            help=f"{flag.help} ({flag.field})",
        )
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


def _run_dir(args: argparse.Namespace) -> Path:
    positional = getattr(args, "run_dir_positional", None)
    if positional is not None and args.run_dir is not None and positional != args.run_dir:
        raise _CliError(f"two run directories given: {positional} and {args.run_dir}")
    run_dir = positional if positional is not None else args.run_dir
    if run_dir is None:
        raise _CliError(f"openqpm {args.command}: give the run directory (RUN_DIR or --run-dir)")
    return Path(run_dir)


def _resolve_config(args: argparse.Namespace, run_dir: Path) -> RunConfig:
    """The config file (or the run's own config.yaml), then the typed flags, then --set."""
    from openqpm.config import apply_overrides, load_config

    base = None
    if args.config is None and (run_dir / "config.yaml").is_file():
        # A command on an existing run continues with that run's configuration.
        base = load_config(run_dir / "config.yaml")
    config = load_config(args.config, base=base)
    typed = {
        f.field: getattr(args, f.dest) for f in args.flags if getattr(args, f.dest) is not None
    }
    config = apply_overrides(config, typed)
    return apply_overrides(config, args.overrides)


def _listed(text: str | None, flag: str, convert: Callable[[str], Any]) -> list[Any]:
    """The values of a comma-separated flag (``--seeds 0,1,2``); [None] when not given."""
    if text is None:
        return [None]
    try:
        return [convert(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _CliError(f"{flag} {text!r}: expected comma-separated values, e.g. 0,1,2") from None


# the commands that run torch (besides the stages): they choose its CPU thread count
_TORCH_COMMANDS = ("demo", "train", "sweep", "predict", "explain", "app")


def _set_threads(requested: int | None) -> None:
    """Choose torch's CPU thread count: the request, else the cores left idle by other work.

    PyTorch's thread team spins while it waits for its slowest thread; on a machine whose cores
    are busy with other processes, two threads can be many times slower than one
    (``benchmarks/training.py`` measures it). So by default we leave busy cores alone.
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


def _run(config: RunConfig, run_dir: Path, stages: Sequence[str] | None, *, resume: bool) -> int:
    from openqpm.api import run

    started = time.perf_counter()
    result = run(config, run_dir, stages=stages, resume=resume, reporter=_ConsoleReporter())
    if _is_rank_zero():
        _print_summary(result, time.perf_counter() - started)
    return 0


def _run_stages(args: argparse.Namespace, stages: Sequence[str] | None) -> int:
    """Run ``stages`` (None: the method's full chain) for every requested seed and method.

    ``--method qpm,sldd`` runs each method on the same run directory (they share its dense
    model); ``--seeds 0,1,2`` runs each seed in ``RUN_DIR/seed<N>``, sharing nothing.
    """
    from openqpm.api import resolve_device
    from openqpm.config import apply_overrides

    run_dir = _run_dir(args)
    seeds = _listed(getattr(args, "seeds", None), "--seeds", int)
    methods = _listed(getattr(args, "field:sparsify.method", None), "--method", str)
    if len(methods) > 1:
        setattr(args, "field:sparsify.method", None)
    for seed in seeds:
        seed_dir = run_dir if seed is None else run_dir / f"seed{seed}"
        for method in methods:
            config = _resolve_config(args, seed_dir)
            changes = {"seed": seed, "sparsify.method": method}
            config = apply_overrides(config, {k: v for k, v in changes.items() if v is not None})
            _init_distributed(resolve_device(config.device))
            _run(config, seed_dir, stages, resume=args.resume)
    return 0


def _print_summary(result: RunResult, elapsed_s: float) -> None:
    print(f"\nRun directory: {result.run_dir}")
    for stage, summary in result.summaries.items():
        shown = ", ".join(f"{k}={_short(v)}" for k, v in summary.items())
        print(f"  {stage:<10} {shown}")
    metrics = result.metrics
    if "evaluate" in result.summaries and metrics is not None:
        from openqpm.metrics import format_metrics_table

        print()
        from openqpm.stages import METHOD_LABELS

        label = METHOD_LABELS.get(result.method, result.method)
        evaluation = metrics.get(result.method) or {}
        print(format_metrics_table(metrics.get("dense"), evaluation, label=label))
        if evaluation.get("one_feature_apart_pairs") is not None:
            print(f"Class pairs one feature apart: {evaluation['one_feature_apart_pairs']}")
        if evaluation.get("conformal"):
            from openqpm.conformal import format_conformal_table

            print("\n" + format_conformal_table(evaluation["conformal"]))
        baseline = metrics.get("baseline_top_weights")
        if baseline:
            print(f"\nBaseline ({baseline['description']}): {baseline['accuracy']:.2f}% accuracy")
    report = result.paths("report")[0]
    if "report" in result.summaries and report.is_file():
        print(f"\nReport: {report.resolve()}")
    print(f"Total time: {_duration(elapsed_s)}")


# ----------------------------------------------------------------------------- commands


def _cmd_train(args: argparse.Namespace) -> int:
    return _run_stages(args, None)


def _cmd_stage(args: argparse.Namespace) -> int:
    return _run_stages(args, (args.command,))


def _cmd_solve(args: argparse.Namespace) -> int:
    if args.problem is None:
        return _run_stages(args, ("problem", "assignment"))
    from openqpm.solver import AssignmentProblem, SolveInterrupted, solve

    given = [f.flag for f in _SOLVE_FLAGS if getattr(args, f.dest) is not None]
    unused = [flag for flag in given if flag not in _SOLVE_FILE_FLAGS]
    if unused or args.overrides or args.config or args.run_dir:
        shown = ", ".join(unused + (["--set"] if args.overrides else []))
        raise _CliError(
            f"solve PROBLEM.npz takes --method, --time-limit, --seed and --out only; got "
            f"{shown or '--config/--run-dir'} (use --run-dir without PROBLEM for a run)"
        )
    method, time_limit_s, seed = _solve_file_settings(args)
    problem = AssignmentProblem.load(args.problem)
    print(
        f"Solving {args.problem}: {problem.A.shape[0]} classes, {problem.A.shape[1]} features, "
        f"select {problem.n_features}, {problem.n_per_class} per class; method {method}, "
        f"limit {time_limit_s:g}s",
        file=sys.stderr,
    )
    out = args.out or args.problem.with_name("assignment.json")
    try:
        assignment = solve(
            problem,
            method=method,
            time_limit_s=time_limit_s,
            seed=seed,
            progress=_ConsoleReporter().solver_progress,
        )
    except SolveInterrupted as interrupted:
        interrupted.assignment.save(out)
        interrupted.path = out
        raise
    assignment.save(out)
    gap = f"{100 * assignment.gap:.3f}%" if assignment.gap is not None else "unknown"
    bound = f"{assignment.bound:.4f}" if assignment.bound is not None else "none"
    print(
        f"objective {assignment.objective:.4f}  bound {bound}  gap {gap}  "
        f"method {assignment.method}  time {assignment.time_s:.1f}s\nwrote {out}"
    )
    return 0


_SOLVE_FILE_FLAGS = ("--method", "--time-limit", "--seed")


def _solve_file_settings(args: argparse.Namespace) -> tuple[str, float, int]:
    """``(method, time limit, seed)`` of ``solve PROBLEM.npz``, checked as a run's config is.

    Each flag not given takes its configuration default (``auto``, 60 s, 0); a given one is
    applied as it is or refused (``--time-limit 0`` is not "the default").
    """
    from openqpm.config import RunConfig, apply_overrides
    from openqpm.solver import solver_methods

    given = {
        flag.field: getattr(args, flag.dest)
        for flag in _SOLVE_FLAGS
        if flag.flag in _SOLVE_FILE_FLAGS and getattr(args, flag.dest) is not None
    }
    config = apply_overrides(RunConfig(), given)  # ConfigError: a value out of range
    method = config.solver.method
    if method not in solver_methods():
        raise _CliError(
            f"--method {method!r} is not a solver method; choose {', '.join(solver_methods())}"
        )
    return method, config.solver.time_limit_s, config.seed


def _cmd_demo(args: argparse.Namespace) -> int:
    from openqpm.config import apply_overrides, demo_config
    from openqpm.data.synthetic import make_synthetic

    run_dir: Path = args.run_dir
    data_dir = run_dir / "data"
    started = time.perf_counter()
    if (data_dir / "openqpm_synthetic.json").is_file():
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
    config = apply_overrides(demo_config(), {"data.root": str(data_dir), "seed": args.seed})
    config = apply_overrides(config, args.overrides)
    from openqpm.api import run

    result = run(config, run_dir, resume=True, reporter=_ConsoleReporter())
    _print_summary(result, time.perf_counter() - started)
    print(
        "\nNext: open the report in a browser, or train on your own data with\n"
        "  openqpm train --config cub_resnet50 --data-root PATH --run-dir runs/cub"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from openqpm.compare import compare, conformal_markdown, html_table, markdown_table

    try:
        comparison = compare(args.run_dirs)
    except ValueError as error:
        raise _CliError(str(error)) from None
    table = markdown_table(comparison)
    sets = conformal_markdown(comparison)
    if sets is not None:
        table += "\n\nCalibrated prediction sets (test coverage %, mean set size):\n\n" + sets
    print(table)
    if args.out is not None:
        from openqpm._io import atomic_write_text

        atomic_write_text(args.out, json.dumps(comparison, indent=2))
        atomic_write_text(args.out.with_suffix(".md"), table + "\n")
        atomic_write_text(args.out.with_suffix(".html"), html_table(comparison))
        print(f"\nwrote {args.out} (and .md, .html beside it)", file=sys.stderr)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from openqpm.api import resolve_device
    from openqpm.config import load_config
    from openqpm.sweep import SWEEPABLE, plot_sweep, run_sweep

    run_dir = _run_dir(args)
    if not (run_dir / "config.yaml").is_file():
        raise _CliError(f"{run_dir} is not a run directory (no config.yaml): train it first")
    chosen = [name for name in SWEEPABLE if getattr(args, name) is not None]
    if len(chosen) != 1:
        raise _CliError("openqpm sweep: give exactly one of --n-features or --bias-strength")
    field = chosen[0]
    values = _listed(getattr(args, field), "--" + field.replace("_", "-"), float)
    config = load_config(run_dir / "config.yaml")
    methods = _listed(args.methods, "--methods", str)
    points = run_sweep(
        config,
        run_dir,
        field=field,
        values=values,
        methods=[config.sparsify.method] if methods == [None] else methods,
        device=resolve_device(config.device),
        reporter=_ConsoleReporter(),
    )
    out = run_dir / "sweep" / f"{field}.png"
    plot_sweep(points, field=field).savefig(out, dpi=120)
    rows = [{"method": p.method, field: p.value, **p.metrics} for p in points]
    from openqpm._io import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=2))
    for point in points:
        print(
            f"{point.method:<10} {field}={point.value:g}  accuracy {point.metrics['accuracy']:.2f}"
        )
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from openqpm.config import config_description, config_names

    for name in config_names():
        print(f"{name:<28} {config_description(name)}")
    return 0


def _cmd_data_make_synthetic(args: argparse.Namespace) -> int:
    from openqpm.data.synthetic import make_synthetic, render_preview

    started = time.perf_counter()
    try:
        root = make_synthetic(
            args.out_dir,
            n_classes=args.classes,
            n_images_per_class=args.images_per_class,
            image_size_px=args.size,
            seed=args.seed,
            correlated_backgrounds=args.correlated_backgrounds,
            overwrite=args.overwrite,
        )
    except FileExistsError:
        if args.overwrite or not args.out_dir.exists():
            raise
        raise _CliError(
            f"{args.out_dir} exists and is not empty: choose a new folder, or pass --overwrite "
            "to replace it"
        ) from None
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


def _cmd_predict(args: argparse.Namespace) -> int:
    """Classify images (files or folders); exit 1 when some could not be read."""
    from dataclasses import asdict

    from openqpm.api import _as_tensor, predict
    from openqpm.app._loaded import image_files, load_run
    from openqpm.data._base import DatasetError

    if args.top_k < 1:
        raise _CliError(f"--top-k must be at least 1, got {args.top_k}")
    loaded = load_run(args.run_dir, which=args.model, device=args.device, method=args.method)
    transform = loaded.transform()
    is_qpm = bool(getattr(loaded.model, "is_qpm", False))
    files = image_files(args.images)
    failed = 0
    batch: list[tuple[Path, Any]] = []

    def flush() -> None:
        if not batch:
            return
        predictions = predict(
            loaded.model,
            [tensor for _, tensor in batch],
            top_k=args.top_k,
            device=loaded.device,
            batch_size=args.batch_size,
        )
        for (path, _), prediction in zip(batch, predictions):
            if args.json:
                record = {"path": str(path), **asdict(prediction), "score_is_sum": is_qpm}
                print(json.dumps(record), flush=True)
            else:
                _print_prediction(path, prediction, loaded.feature_labels, is_qpm=is_qpm)
        batch.clear()

    for path in files:
        try:
            batch.append((path, _as_tensor(path, transform)))
        except DatasetError as error:
            failed += 1
            print(f"openqpm predict: skipped {error}", file=sys.stderr)  # names the file
            continue
        if len(batch) >= args.batch_size:
            flush()
    flush()
    if failed:
        print(
            f"openqpm predict: {failed} of {len(files)} file(s) could not be read", file=sys.stderr
        )
    return 1 if failed else 0


def _print_prediction(
    path: Path, prediction: Any, feature_labels: Sequence[str], *, is_qpm: bool
) -> None:
    top = prediction.top_classes[0]
    print(f"{path}: {top.class_name} (score {top.score:.4f})")
    for rank, item in enumerate(prediction.top_classes, start=1):
        print(f"  {rank:>2}. {item.class_name:<32} {item.score:9.4f}")
    features = prediction.features
    if is_qpm:
        total = sum(f.contribution for f in features)
        print(f"  {top.class_name}: score = sum of its {len(features)} features = {total:.4f}")
    else:  # a dense or sparse head: bias and many small terms; show the largest
        print(f"  {top.class_name}: largest contributions of {len(features)} features")
        features = features[:10]
    for item in features:
        print(
            f"    f{item.feature:<4} ({feature_labels[item.feature]:<14}) activation "
            f"{item.activation:8.4f}  "
            f"contribution {item.contribution:+9.4f}"
        )


DEFAULT_ALPHA = 0.1  # `explain --alpha`: the calibrated set's miscoverage (90% coverage)


def _cmd_explain(args: argparse.Namespace) -> int:
    """Explain one image: text on stdout (with the hierarchy's path and, when the run is
    calibrated, the prediction set at --alpha), the local explanation figure in --out and, for a
    binary head, the tree in --tree-out."""
    from openqpm.api import explain_prediction
    from openqpm.app._loaded import load_run
    from openqpm.data._base import open_rgb

    alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
    if not 0.0 < alpha < 1.0:  # also NaN
        raise _CliError(f"--alpha must be in (0, 1) (e.g. 0.1 for 90% coverage), got {alpha}")
    loaded = load_run(args.run_dir, device=args.device, method=args.method)
    if args.alpha is not None and loaded.calibration is None:
        hint = (
            "train with `--set data.calibration_fraction=0.1` to hold out calibration images"
            if loaded.has_hierarchy
            else "calibrated sets need a binary head: explain with --method qpm or chiqpm"
        )
        raise _CliError(
            f"--alpha: {args.run_dir} has no calibrated prediction sets for {loaded.method} "
            f"({loaded.calibration_note}); {hint}"
        )
    if args.tree_out is not None and not loaded.has_hierarchy:
        raise _CliError(
            f"--tree-out: the {loaded.method} model's head is not binary (QPM, CHiQPM): "
            "it has no hierarchical explanation to draw"
        )
    image = open_rgb(args.image)  # DatasetError naming the file when it cannot be read
    try:
        versus = None if args.versus is None else loaded.class_index(args.versus)
    except ValueError as error:
        raise _CliError(f"--versus: {error}") from None
    explanation = explain_prediction(
        loaded.model,
        image,
        versus=versus,
        device=loaded.device,
        calibration=loaded.calibration,
        alpha=alpha,
    )
    print(explanation.text())
    figure, _ = loaded.explanation_figure(image, versus=versus)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110, bbox_inches="tight")
    print(f"wrote {args.out}", file=sys.stderr)
    if explanation.hierarchy is not None:
        chosen = explanation.calibrated_set
        tree = loaded.tree_figure(
            explanation.hierarchy, calibrated_set=None if chosen is None else chosen.classes
        )
        tree_out = args.tree_out or args.out.with_name(f"{args.out.stem}_tree.png")
        tree_out.parent.mkdir(parents=True, exist_ok=True)
        tree.savefig(tree_out, dpi=110, bbox_inches="tight")
        print(f"wrote {tree_out}", file=sys.stderr)
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    """Serve the interactive explorer of a run (needs the ``app`` extra: gradio)."""
    from openqpm.app import GradioMissingError, build_app, launch

    started = time.perf_counter()
    try:
        app = build_app(args.run_dir, device=args.device, method=args.method)
    except GradioMissingError as error:
        raise _CliError(str(error)) from None
    print(
        f"openqpm app: serving {args.run_dir} on http://{args.host}:{args.port} "
        f"(loaded in {time.perf_counter() - started:.1f}s; Ctrl-C to stop)",
        flush=True,
    )
    launch(app, host=args.host, port=args.port, run_dir=args.run_dir)
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

    _add_training_commands(commands)
    _add_result_commands(commands)
    _add_data_commands(commands)
    return parser


def _add_training_commands(commands: Any) -> None:
    """demo, train, one command per stage of the table, solve."""
    demo = commands.add_parser(
        "demo", help="generate the embedded data set and train a QPM on it end to end (CPU)"
    )
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="run directory")
    demo.add_argument("--classes", type=int, default=50, help="classes of the embedded data set")
    demo.add_argument("--images-per-class", type=int, default=None, help="images per class")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    demo.set_defaults(handler=_cmd_demo)

    train = commands.add_parser("train", help="run every stage of a method: dense, ..., report")
    _add_run_options(train, positional_run_dir=False)
    train.add_argument(
        "--seeds", help="several seeds, each in RUN_DIR/seed<N> (e.g. 0,1,2); --method may list"
    )
    train.set_defaults(handler=_cmd_train)

    for stage in STAGES:
        if stage.command:
            sub = commands.add_parser(stage.name, help=f"{stage.description} (stage {stage.name})")
            _add_run_options(sub, positional_run_dir=True)
            sub.set_defaults(handler=_cmd_stage)

    solve = commands.add_parser(
        "solve",
        help="solve an assignment problem (problem.npz), or the problem of a run directory",
    )
    solve.add_argument("problem", type=Path, nargs="?", help="problem.npz (A, R, b, sizes)")
    solve.add_argument("--out", type=Path, help="assignment.json to write")
    _add_run_options(solve, positional_run_dir=False, flags=_SOLVE_FLAGS)
    solve.set_defaults(handler=_cmd_solve)


def _add_result_commands(commands: Any) -> None:
    """compare, sweep, predict, explain, app: what a finished run is used for."""
    compare = commands.add_parser(
        "compare", help="the paper's table: every method and seed of the given run directories"
    )
    compare.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    compare.add_argument(
        "--out", type=Path, help="comparison.json to write (and its .md and .html tables beside)"
    )
    compare.set_defaults(handler=_cmd_compare)

    sweep = commands.add_parser(
        "sweep", help="solve and fine-tune a finished run at several n_features or bias strengths"
    )
    sweep.add_argument("run_dir_positional", type=Path, metavar="RUN_DIR")
    sweep.add_argument("--n-features", dest="n_features", help="values, e.g. 10,20,30,40,50")
    sweep.add_argument("--bias-strength", dest="bias_strength", help="values, e.g. 0,0.3,1,3")
    sweep.add_argument("--methods", help="methods to sweep (default: the run's), e.g. qpm,sldd")
    sweep.set_defaults(handler=_cmd_sweep, run_dir=None)

    predict = commands.add_parser(
        "predict", help="classify images with a trained run: top classes and their features"
    )
    predict.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    predict.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    predict.add_argument("--json", action="store_true", help="one JSON object per line per image")
    predict.add_argument(
        "--model",
        choices=["model", "dense"],
        default="model",
        help="the method's model (default) or the dense one",
    )
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    predict.add_argument("--device", help="default: the run's config (auto, cpu, cuda:N)")
    _add_method_option(predict)
    predict.set_defaults(handler=_cmd_predict)

    explain = commands.add_parser(
        "explain", help="explain one image: its class's features, heatmaps, why not another"
    )
    explain.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    explain.add_argument("image", type=Path, metavar="IMAGE")
    explain.add_argument("--versus", metavar="CLASS", help="class to contrast (name or index)")
    explain.add_argument(
        "--out", type=Path, default=Path("explanation.png"), help="figure to write"
    )
    explain.add_argument("--device", help="default: the run's config (auto, cpu, cuda:N)")
    explain.add_argument(
        "--alpha",
        type=float,
        help=f"miscoverage of the calibrated prediction set (default {DEFAULT_ALPHA}: 90%% "
        "coverage); needs a run trained with --set data.calibration_fraction=0.1",
    )
    explain.add_argument(
        "--tree-out",
        type=Path,
        help="hierarchy tree figure to write (default: <--out stem>_tree.png beside --out)",
    )
    _add_method_option(explain)
    explain.set_defaults(handler=_cmd_explain)

    app = commands.add_parser(
        "app", help='interactive explorer of a run in the browser (pip install "openqpm[app]")'
    )
    app.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    app.add_argument("--host", default="127.0.0.1")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--device", help="default: the run's config (auto, cpu, cuda:N)")
    _add_method_option(app)
    app.set_defaults(handler=_cmd_app)


def _add_method_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        help="the method whose model to use, in a run trained with several "
        "(`train --method qpm,chiqpm`); default the run's sparsify.method",
    )


def _add_data_commands(commands: Any) -> None:
    """configs and data (make-synthetic, check)."""
    configs = commands.add_parser("configs", help="list the shipped configurations")
    configs.set_defaults(handler=_cmd_configs)

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
    make.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR when it exists and is not empty"
    )
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
    try:
        if args.command in _TORCH_COMMANDS or args.command in stage_names():
            _set_threads(args.threads)
        return int(handler(args))
    except KeyboardInterrupt as interrupt:
        print(
            f"\nopenqpm: interrupted{_solve_kept(interrupt)}{_how_to_continue(args)}",
            file=sys.stderr,
        )
        return 130
    except Exception as error:
        # Known, explained failures (bad data, bad input, a file that cannot be read or written)
        # become one clear line (-v adds the traceback); anything else keeps its traceback so
        # that it can be reported.
        message = _explained(error)
        if message is None:
            raise
        if getattr(args, "verbose", False) and not isinstance(error, _CliError):
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        print(f"openqpm: {message}", file=sys.stderr)
        return 2


def _how_to_continue(args: argparse.Namespace) -> str:
    """What to do after Ctrl-C: ``--resume`` only where the command has it."""
    if args.command == "demo":
        return "; run the same command again to continue (it resumes where it stopped)"
    if getattr(args, "resume", None) is None or getattr(args, "problem", None) is not None:
        return ""  # no --resume (solve PROBLEM.npz has nothing to resume)
    if args.resume:
        return "; run the same command again to continue"
    return "; run the same command with --resume to continue"


def _explained(error: Exception) -> str | None:
    """The one line for an expected error, or None for anything else (a bug)."""
    from openqpm.config import ConfigError

    if isinstance(error, ConfigError):
        return f"config error: {error}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        # raised by the OS about one file: not enough permissions, a full disk, ...
        where = str(error.filename)
        if error.filename2 is not None:
            where += f" -> {error.filename2}"
        return f"error: {where}: {error.strerror}"
    if isinstance(error, _explained_errors()):
        return f"error: {error}"
    return None


def _solve_kept(interrupt: KeyboardInterrupt) -> str:
    """What a Ctrl-C during a solve kept: the best assignment so far, and where it was written."""
    assignment = getattr(interrupt, "assignment", None)
    path = getattr(interrupt, "path", None)
    if assignment is None or path is None:
        return ""
    gap = "unknown" if assignment.gap is None else f"{100 * assignment.gap:.3f}%"
    return (
        f" during the solve; the best assignment so far (objective {assignment.objective:.4f}, "
        f"gap {gap}) is in {path}"
    )


def _explained_errors() -> tuple[type[BaseException], ...]:
    from openqpm.data._base import DatasetError
    from openqpm.solver.problem import InvalidAssignmentError, ProblemFileError
    from openqpm.training import CheckpointError, TrainingDivergedError

    return (
        _CliError,
        PipelineError,
        DatasetError,
        TrainingDivergedError,
        CheckpointError,
        ProblemFileError,
        InvalidAssignmentError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
