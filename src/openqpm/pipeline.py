"""Runs the stage table over a run directory; each artifact is keyed by the config that made it.

The stages and every fact about them live in :mod:`openqpm.stages`. ``stages.json`` records, for
every finished stage, the hash of the configuration fields it depends on
(:func:`openqpm.stages.stage_hash`, upstream stages included) and the size and SHA-256 of each
file it wrote. A stage is reused only when that hash matches and its files are still the ones it
wrote; otherwise it and everything made from it is recomputed. Interrupted training resumes from
its last epoch checkpoint; a finished stage deletes its checkpoints of other configurations.

One run at a time per run directory: :func:`run_pipeline` holds ``run.lock`` (the pid and host
of its holder) while it works, and a second run on the same directory fails at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from openqpm import distributed
from openqpm._io import (
    atomic_write_text,
    is_main_process,
    path_checksum,
    pid_is_alive,
    to_jsonable,
)
from openqpm.config import (
    ConfigError,
    RunConfig,
    field_value,
    load_config,
    resolved_reduced_strides,
    save_config,
)
from openqpm.stages import (
    METHODS,
    STAGES,
    PipelineError,
    Reporter,
    StageContext,
    downstream_of,
    get_stage,
    needs_of,
    outputs_of,
    run_stage,
    stage_hash,
    stage_key,
    stage_names,
    stages_for,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

_logger = logging.getLogger(__name__)

__all__ = [
    "LOCK_FILE",
    "PipelineError",
    "Reporter",
    "check_choices",
    "check_inputs",
    "read_stage_state",
    "run_pipeline",
    "stage_is_current",
]


def read_stage_state(run_dir: str | Path) -> dict[str, Any]:
    """The recorded hashes and summaries of the finished stages (empty for a new run)."""
    path = Path(run_dir) / "stages.json"
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PipelineError(f"{path} is not valid JSON ({error}); delete it to recompute") from None
    if not isinstance(state, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return state


def stage_is_current(config: RunConfig, run_dir: str | Path, stage: str) -> bool:
    """True when ``stage`` finished with the same configuration hash and its files are unchanged.

    Unchanged: each file (or folder) it writes has the size and SHA-256 recorded when it
    finished, so a truncated or replaced artifact is recomputed, not trusted.
    """
    return _why_not_current(config, Path(run_dir), stage) is None


class _Damaged(str):
    """The reason a stage is not current when its files are not those it wrote (logged louder)."""


def _why_not_current(config: RunConfig, run_dir: Path, stage: str) -> str | None:
    """None when ``stage`` is current in ``run_dir``, else the reason, for the log."""
    entry = read_stage_state(run_dir).get(stage_key(stage, config))
    if not isinstance(entry, dict):
        return "not run yet"
    if entry.get("hash") != stage_hash(config, stage):
        return "made with another configuration"
    names = outputs_of(stage, config)
    missing = [name for name in names if not (run_dir / name).exists()]
    if missing:
        return _Damaged(f"{', '.join(missing)} missing")
    recorded = entry.get("outputs")
    if recorded is None:
        # A record written before openqpm recorded checksums. Trusted (as it was then) rather
        # than recomputed: its files were written atomically, and recomputing would retrain a
        # dense model for hours merely because openqpm was upgraded. The next run that finds it
        # records the files' checksums (_adopt_legacy_records), so from then on they are checked.
        return None
    if not isinstance(recorded, dict):
        return _Damaged("its record in stages.json has no valid checksums")
    for name in names:
        expected = recorded.get(name)
        if not isinstance(expected, dict):
            return _Damaged(f"{name} has no checksum in stages.json")
        try:
            size, digest = _checksum(run_dir / name)
        except OSError as error:
            return _Damaged(f"{name} cannot be read ({error})")
        if size != expected.get("size") or digest != expected.get("sha256"):
            return _Damaged(
                f"{name} is not what the stage wrote ({size} bytes, recorded "
                f"{expected.get('size')}; another checksum): truncated or changed since"
            )
    return None


# Checksums of files that have not changed since they were last read, keyed by everything that
# changes when a file is written (ctime included: it cannot be set back), so that the several
# checks of one run (and a notebook's repeated runs) read each large artifact once.
_CHECKSUMS: dict[tuple[Any, ...], tuple[int, str]] = {}
_CHECKSUM_CACHE_SIZE = 1024


def _stat_key(path: Path) -> tuple[Any, ...]:
    info = path.stat()
    return (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _checksum(path: Path) -> tuple[int, str]:
    """:func:`openqpm._io.path_checksum` of a file or folder, unless nothing in it changed."""
    if path.is_dir():
        files = [Path(folder) / name for folder, _, names in os.walk(path) for name in names]
        key: tuple[Any, ...] = (str(path), *sorted(_stat_key(file) for file in files))
    else:
        key = _stat_key(path)
    if key not in _CHECKSUMS:
        if len(_CHECKSUMS) >= _CHECKSUM_CACHE_SIZE:
            _CHECKSUMS.clear()
        _CHECKSUMS[key] = path_checksum(path)
    return _CHECKSUMS[key]


def _output_checksums(config: RunConfig, run_dir: Path, stage: str) -> dict[str, Any]:
    """``{output: {"size", "sha256"}}`` of what ``stage`` wrote, for its record."""
    checksums = {}
    for name in outputs_of(stage, config):
        try:
            size, digest = _checksum(run_dir / name)
        except FileNotFoundError:
            raise PipelineError(
                f"stage {stage} finished without writing {run_dir / name}"
            ) from None
        checksums[name] = {"size": size, "sha256": digest}
    return checksums


# ----------------------------------------------------------------------------- checks


def _choice_lists() -> list[tuple[str, Sequence[str]]]:
    """``(field, valid names)`` for every field chosen from a list; each list lives in its module."""
    from openqpm.constants import BIAS_NAMES, CLASS_MEASURES, R_SCALINGS
    from openqpm.data import dataset_names
    from openqpm.data.transforms import AUGMENTATIONS
    from openqpm.solver import solver_methods

    return [
        ("sparsify.method", METHODS),
        ("data.dataset", dataset_names()),
        ("data.augment", AUGMENTATIONS),
        ("solver.method", solver_methods()),
        ("solver.bias", BIAS_NAMES),
        ("solver.r_scaling", R_SCALINGS),
        ("solver.class_measure", CLASS_MEASURES),
    ]


def check_choices(config: RunConfig) -> None:
    """Every name chosen from a list is valid; takes well under a second.

    Raises:
        PipelineError: naming the field, its value and the valid names.
    """
    for name, valid in _choice_lists():
        value = field_value(config, name)
        if value not in valid:
            raise PipelineError(f"{name}={value!r} is not valid; choose {', '.join(valid)}")
    if config.model.weights and not Path(config.model.weights).is_file():
        raise PipelineError(f"model.weights: file {config.model.weights} does not exist")
    from openqpm.solver import forced_pair_methods

    if config.sparsify.method == "chiqpm" and config.solver.method not in forced_pair_methods():
        raise PipelineError(
            f"solver.method={config.solver.method!r} cannot force CHiQPM's class pairs; "
            f"choose {', '.join(forced_pair_methods())}"
        )


def _check_backbone(config: RunConfig) -> None:
    from openqpm.models import backbone_names, create_backbone

    model, size = config.model, config.data.image_size_px
    if model.arch not in backbone_names() and not model.arch.startswith("timm:"):
        raise PipelineError(
            f"model.arch: unknown backbone {model.arch!r}; valid: {', '.join(backbone_names())}"
        )
    try:
        backbone = create_backbone(model.arch, reduced_strides=resolved_reduced_strides(model))
        backbone.check_image_size(size)
    except ValueError as error:
        raise PipelineError(f"data.image_size_px={size}: {error}") from None
    except (KeyError, ImportError) as error:
        raise PipelineError(str(error)) from None
    if config.solver.n_features > int(backbone.n_features):
        raise PipelineError(
            f"solver.n_features={config.solver.n_features} is larger than the "
            f"{backbone.n_features} features of {model.arch}"
        )


def _check_data(config: RunConfig) -> None:
    from openqpm.data import check_dataset

    data = config.data
    if not data.root:
        raise PipelineError("data.root is empty: pass --data-root PATH (the data set folder)")
    if not Path(data.root).exists():
        raise PipelineError(f"data set folder {data.root} does not exist")
    # A decoded sample is enough here: `openqpm data check` does the full pass on request.
    problems = check_dataset(data.root, data.dataset, image_check="sample")
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise PipelineError(
            f"data set {data.root} ({data.dataset}) is not usable:\n  {shown}{more}"
        )


def check_inputs(config: RunConfig, *, images: bool = True) -> None:
    """Everything that can be checked before hours of training, with a clear error each.

    Args:
        config: the run's configuration.
        images: also check the backbone and the data set folder (the stages that read images).

    Raises:
        PipelineError: a name not in its list, a missing weights file, an unknown backbone, an
            image size the backbone cannot take, more features than the backbone has, or a data
            set folder that is missing or unusable.
    """
    check_choices(config)
    if images:
        _check_backbone(config)
        _check_data(config)


# ----------------------------------------------------------------------------- the loop


def _check_upstream(config: RunConfig, run_dir: Path, name: str, requested: Sequence[str]) -> None:
    """A stage whose inputs are neither current nor about to be made cannot run: say which."""
    for upstream in needs_of(name, config):
        if upstream not in requested and not stage_is_current(config, run_dir, upstream):
            raise PipelineError(
                f"stage {name} needs stage {upstream}, which is missing or was made with "
                f"another configuration in {run_dir}; run `openqpm train` or that stage first"
            )


def _record(config: RunConfig, run_dir: Path, name: str, summary: dict[str, Any]) -> None:
    """Record a finished stage and forget everything that was made from its old result."""
    state = read_stage_state(run_dir)
    state[stage_key(name, config)] = {
        "hash": stage_hash(config, name),
        "outputs": _output_checksums(config, run_dir, name),
        "summary": to_jsonable(summary),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for later in downstream_of(name, config):
        state.pop(stage_key(later, config), None)
    atomic_write_text(run_dir / "stages.json", json.dumps(state, indent=2, sort_keys=True))


def _adopt_legacy_records(config: RunConfig, run_dir: Path, names: Sequence[str]) -> None:
    """Give the current records written without checksums the checksums of their files."""
    state = read_stage_state(run_dir)
    adopted = []
    for name in names:
        entry = state.get(stage_key(name, config))
        if (
            isinstance(entry, dict)
            and "outputs" not in entry
            and stage_is_current(config, run_dir, name)
        ):
            entry["outputs"] = _output_checksums(config, run_dir, name)
            adopted.append(name)
    if not adopted:
        return
    try:
        atomic_write_text(run_dir / "stages.json", json.dumps(state, indent=2, sort_keys=True))
    except OSError as error:  # a read-only copy of a run: they stay trusted as they are
        _logger.info("could not record the checksums of %s: %s", ", ".join(adopted), error)
        return
    _logger.info("recorded the checksums of %s (a record of an older openqpm)", ", ".join(adopted))


def _save_config_if_changed(config: RunConfig, path: Path) -> None:
    """Write ``config.yaml`` unless it already holds this configuration.

    So a finished run can be re-run from a read-only copy, and the file keeps the time it was
    last changed.
    """
    if path.is_file():
        try:
            if load_config(path) == config:
                return
        except ConfigError:
            pass  # unreadable: replaced by the configuration this run uses
    save_config(config, path)


def _delete_superseded_checkpoints(run_dir: Path, stage: str, digest: str) -> None:
    """Delete ``checkpoints/<stage>[-part]-<hash>.safetensors`` of every hash but ``digest``.

    Checkpoint names are ``f"{stage}{part}-{digest}.safetensors"`` (``_runs._train``): a finished
    stage no longer needs the checkpoints of its earlier configurations, which otherwise stay
    forever (a ResNet-50 checkpoint with its optimiser state is about 200 MB).
    """
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    pattern = re.compile(rf"{re.escape(stage)}(?:-.+)?-([0-9a-f]{{16}})\.safetensors")
    # a longer stage name that starts with this one (none today) keeps its own checkpoints
    longer = [other + "-" for other in stage_names() if other.startswith(stage + "-")]
    for file in sorted(folder.iterdir()):
        match = pattern.fullmatch(file.name)
        if match is None or match.group(1) == digest or file.name.startswith(tuple(longer)):
            continue
        file.unlink(missing_ok=True)
        _logger.info("deleted %s: a checkpoint of another configuration of %s", file, stage)


# ----------------------------------------------------------------------------- the lock

#: The lock file a run holds in its run directory.
LOCK_FILE = "run.lock"
_LOCK_ATTEMPTS = 5
_HALF_WRITTEN_LOCK_S = 10.0  # a lock file without its JSON after this long is a crashed writer
_TAKEOVER_TIMEOUT_S = 60.0


class _ReadOnly(Exception):
    """The run directory cannot be written (the lock cannot be created)."""


def _lock_text() -> str:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return json.dumps(holder, sort_keys=True) + "\n"


def _read_lock(path: Path) -> tuple[str, dict[str, Any]] | None:
    """``(text, holder)`` of a lock file; the holder is {} when it is not (yet) valid JSON."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        age_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    if not isinstance(holder, dict):
        holder = {}
    holder["age_s"] = age_s
    return text, holder


def _is_stale(holder: dict[str, Any]) -> bool:
    """A lock whose process is gone: its pid is not alive on this host."""
    pid = holder.get("pid")
    if not isinstance(pid, int):  # created, never written: a writer killed at that instant
        return float(holder["age_s"]) > _HALF_WRITTEN_LOCK_S
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    return pid != os.getpid() and not pid_is_alive(pid)


def _take_over(path: Path, stale_text: str) -> None:
    """Delete the stale lock ``path`` if it still holds ``stale_text``.

    Two runs that find the same stale lock must not both take it over (the second would delete
    the first's new lock): the deletion happens only while holding ``run.lock.takeover``.
    """
    guard = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > _TAKEOVER_TIMEOUT_S:
                guard.unlink()  # left by a process killed while taking over
        time.sleep(0.1)
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text(encoding="utf-8", errors="replace") == stale_text:
                path.unlink()
    finally:
        guard.unlink(missing_ok=True)


def _acquire(path: Path) -> str:
    """Create the lock file (O_CREAT | O_EXCL) and return what it holds.

    Raises:
        PipelineError: another live run holds it (its pid and host are named).
        _ReadOnly: the run directory cannot be written.
    """
    text = _lock_text()
    for _ in range(_LOCK_ATTEMPTS):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            found = _read_lock(path)
            if found is None:
                continue  # released between the two calls: try again
            held_text, holder = found
            if not _is_stale(holder):
                raise PipelineError(_held_message(path, holder)) from None
            _logger.warning(
                "%s: taking over the stale lock of pid %s on %s (that process is gone)",
                path,
                holder.get("pid", "?"),
                holder.get("host", "?"),
            )
            _take_over(path, held_text)
            continue
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise _ReadOnly(str(error)) from None
            raise
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        return text
    raise PipelineError(f"could not take the lock {path}: other runs keep taking it; try again")


def _held_message(path: Path, holder: dict[str, Any]) -> str:
    pid, host = holder.get("pid"), holder.get("host")
    if not isinstance(pid, int):
        return f"{path.parent} is being locked by another run right now ({path}); try again"
    since = f" since {holder['started_at']}" if holder.get("started_at") else ""
    where = "this machine" if host == socket.gethostname() else f"host {host}"
    return (
        f"{path.parent} is in use by another run: pid {pid} on {where}{since} holds {path}. "
        f"Wait for it to finish; if that process is gone, delete {path}"
    )


def _release(path: Path, text: str) -> None:
    """Delete the lock file if it is still ours."""
    try:
        if path.read_text(encoding="utf-8", errors="replace") == text:
            path.unlink()
        else:
            _logger.warning("%s was replaced by another run's lock: left in place", path)
    except FileNotFoundError:
        _logger.warning("%s was deleted while this run held it", path)


@contextlib.contextmanager
def _locked(run_dir: Path, *, read_only_ok: bool) -> Iterator[bool]:
    """Hold ``run_dir/run.lock`` for the block; released on any exit.

    Under ``torch.distributed`` only rank 0 takes it (the other ranks are the same run), and every
    rank fails when rank 0 could not.

    Args:
        run_dir: the run directory (it exists).
        read_only_ok: a run directory that cannot be written is used without the lock (a run
            that has nothing to compute only reads it).

    Yields:
        False when the run directory is used read-only (without the lock), else True.
    """
    path = run_dir / LOCK_FILE
    text: str | None = None
    failure: PipelineError | None = None
    if is_main_process():
        try:
            text = _acquire(path)
        except PipelineError as error:
            failure = error
        except _ReadOnly as error:
            if not read_only_ok:
                failure = PipelineError(f"the run directory {run_dir} cannot be written ({error})")
            else:
                _logger.info("%s cannot be written (%s): reading it without a lock", run_dir, error)
    if distributed.is_distributed():
        flags = {"failed": np.array([failure is not None], dtype=np.int64)}
        if distributed.all_reduce_arrays(flags)["failed"][0] and failure is None:
            failure = PipelineError(f"rank 0 could not lock {path}; see its message")
    if failure is not None:
        raise failure
    try:
        yield text is not None or not is_main_process()
    finally:
        if text is not None:
            _release(path, text)


# ----------------------------------------------------------------------------- run


def run_pipeline(
    config: RunConfig,
    run_dir: str | Path,
    *,
    device: torch.device,
    stages: Sequence[str] | None = None,
    resume: bool = True,
    reporter: Reporter | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the requested stages over ``run_dir``, reusing every stage whose inputs are unchanged.

    Args:
        config: the resolved run configuration (saved as ``config.yaml`` when it differs from
            the one there).
        run_dir: the run directory; created if missing.
        device: where models run (the CLI and :func:`openqpm.api.resolve_device` pick it).
        stages: names from :func:`openqpm.stages.stage_names` (default: every stage of the
            configuration's method, :func:`openqpm.stages.stages_for`); the stages they need
            must be current in ``run_dir`` or requested too.
        resume: continue interrupted training from its last checkpoint.
        reporter: receives progress; default logs only.

    Returns:
        ``{stage: summary}`` for every requested stage (reused ones included), in run order.

    Raises:
        PipelineError: an input is missing or invalid (the message names it), or another run
            holds the run directory's lock (the message names its pid).
    """
    check_choices(config)
    requested = [get_stage(name).name for name in (stages or stages_for(config))]
    run_dir = Path(run_dir)
    pending = [s.name for s in STAGES if s.name in requested]
    stale: set[str] = set()
    for name in pending:
        if name in stale or not stage_is_current(config, run_dir, name):
            stale.update((name, *downstream_of(name, config)))
    check_inputs(config, images=any(get_stage(name).reads_images for name in stale & set(pending)))
    run_dir.mkdir(parents=True, exist_ok=True)
    with _locked(run_dir, read_only_ok=not stale & set(pending)) as writable:
        if is_main_process() and writable:
            _save_config_if_changed(config, run_dir / "config.yaml")
            _adopt_legacy_records(config, run_dir, pending)
        return _run_locked(config, run_dir, pending, device, resume, reporter or Reporter())


def _run_locked(
    config: RunConfig,
    run_dir: Path,
    pending: Sequence[str],
    device: torch.device,
    resume: bool,
    reporter: Reporter,
) -> dict[str, dict[str, Any]]:
    """The loop of :func:`run_pipeline`, while it holds the lock."""
    ctx = StageContext(config, run_dir, device, reporter, resume)
    summaries: dict[str, dict[str, Any]] = {}
    recomputing: set[str] = set()
    for name in pending:
        reason = None if name in recomputing else _why_not_current(config, run_dir, name)
        if name not in recomputing and reason is None:
            summaries[name] = read_stage_state(run_dir)[stage_key(name, config)].get("summary", {})
            ctx.reporter.stage_skipped(name, "up to date (same configuration hash)")
            continue
        if isinstance(reason, _Damaged):
            _logger.warning("recomputing stage %s: %s", name, reason)
        _check_upstream(config, run_dir, name, pending)
        summaries[name] = run_stage(ctx, name)
        if is_main_process():
            _record(config, run_dir, name, summaries[name])
            _delete_superseded_checkpoints(run_dir, name, stage_hash(config, name))
        distributed.barrier()
        ctx.reporter.stage_finished(name, summaries[name])
        recomputing.update(downstream_of(name, config))
    return summaries
