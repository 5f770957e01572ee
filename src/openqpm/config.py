"""Typed, frozen run configuration; YAML in and out; ``key=value`` overrides; stage hashes.

A configuration is a tree of frozen dataclasses. Every field has a default and a short comment;
a YAML file only overrides defaults, and the resolved configuration is saved with the results
(``config.yaml`` in the run directory). The defaults reproduce the paper's CUB-200-2011 /
ResNet-50 recipe as the reference code runs it.

Example:
    >>> cfg = load_config(None, overrides=["solver.n_features=40", "dense.epochs=3"])
    >>> cfg.solver.n_features
    40
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "DenseConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RunConfig",
    "SolverConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "demo_config",
    "load_config",
    "save_config",
    "stage_hash",
]


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names the field."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are fed."""

    dataset: str = "cub"  # a name from openqpm.data.dataset_names()
    root: str = ""  # the data set folder (see README for each layout)
    crop: bool = True  # crop to the ground-truth box where the set has boxes (CUB, Cars, ...)
    image_size_px: int = 224  # side of the square network input
    augment: str = "paper"  # paper: flip, jitter, TrivialAugmentWide | light: flip, jitter
    batch_size: int = 16  # per process; the paper uses 16 for fine-grained sets, 64 for ImageNet
    num_workers: int = 4  # DataLoader worker processes


@dataclass(frozen=True)
class ModelConfig:
    """The backbone and the two heads."""

    arch: str = "resnet50"  # a name from openqpm.models.backbone_names()
    weights: str | None = None  # local pretrained weights file; None = random init
    # stride 1 in the last two ResNet stages (28x28 maps at 224 px); None = on for ResNets only
    reduced_strides: bool | None = None
    dense_dropout: float = 0.2  # dropout on pooled features of the dense head
    qpm_dropout: float = 0.1  # dropout before the fixed normalisation of the QPM head
    diversity_beta: float | None = None  # feature diversity loss weight; None = per-arch default


@dataclass(frozen=True)
class DenseConfig:
    """Dense training with the feature diversity loss (paper App. C; reference code values)."""

    skip: bool = False  # use the (pretrained) backbone as the dense model, as for ImageNet
    epochs: int = 150
    lr_backbone: float = 5e-3
    lr_head: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    step_size_epochs: int = 30  # StepLR step
    gamma: float = 0.4  # StepLR decay


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning of the backbone with the binary assignment fixed."""

    epochs: int = 40
    lr_backbone: float = 1e-4  # the reference code's value (1/100 of the dense head lr)
    lr_head: float = 1e-4  # unused by the QPM head (nothing trainable); kept for symmetry
    momentum: float = 0.95
    weight_decay: float = 5e-4
    step_size_epochs: int = 10
    gamma: float = 0.4


@dataclass(frozen=True)
class SolverConfig:
    """The quadratic problem's constants and its solver."""

    n_features: int = 50  # features selected out of the backbone's n_f
    n_per_class: int = 5  # features assigned to every class
    bias: str = "locality"  # locality | locality_paper | center | none
    bias_strength: float = 1.0 / math.sqrt(10.0)  # max |b| (the paper's lambda)
    r_scaling: str = "code"  # code: (r - m)/(M - m) | paper: r / M
    method: str = "auto"  # auto | search | milp | paper | gurobi
    time_limit_s: float = 60.0


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the resolved copy is saved as ``config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    seed: int = 0  # seeds data order, initialisation, the solver and the metrics
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision (CUDA only)
    report_max_classes: int | None = None  # limit the HTML report to the first N classes


_T = TypeVar("_T")


def resolved_reduced_strides(model: ModelConfig) -> bool:
    """``model.reduced_strides``, with None meaning: on for ResNets (as the paper), off otherwise."""
    if model.reduced_strides is None:
        return model.arch in {"resnet18", "resnet34", "resnet50"}
    return model.reduced_strides


def demo_config() -> RunConfig:
    """The configuration of ``openqpm demo``: the embedded data set, a small CNN, CPU-sized.

    ``configs/demo.yaml`` holds the same values (a test keeps the two equal).
    """
    return RunConfig(
        data=DataConfig(
            dataset="synthetic",
            root="",
            crop=True,
            image_size_px=64,
            augment="light",
            batch_size=32,
            num_workers=0,
        ),
        model=ModelConfig(arch="small_cnn", weights=None, reduced_strides=None),
        dense=DenseConfig(
            epochs=12,
            lr_backbone=0.05,
            lr_head=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            step_size_epochs=5,
            gamma=0.4,
        ),
        finetune=FinetuneConfig(
            epochs=5,
            lr_backbone=5e-3,
            lr_head=5e-3,
            momentum=0.9,
            weight_decay=5e-4,
            step_size_epochs=3,
            gamma=0.4,
        ),
        solver=SolverConfig(n_features=50, n_per_class=5, time_limit_s=20.0),
        seed=0,
        device="cpu",
        amp=False,
    )


# ----------------------------------------------------------------------------- dict conversion


def config_to_dict(config: Any) -> dict[str, Any]:
    """Convert a configuration dataclass (tree) to plain dicts, lists and scalars."""
    if not is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a configuration dataclass instance, got {type(config)!r}")
    return dataclasses.asdict(config)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one scalar against its annotation; ``where`` names the field."""
    text = str(annotation)
    allows_none = "None" in text
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {text})")
    if annotation is bool or text.startswith("bool"):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int or text.startswith("int"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float or text.startswith("float"):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is str or text.startswith("str"):
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type[_T], data: Mapping[str, Any], where: str) -> _T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown field(s) {', '.join(unknown)}; "
            f"valid fields: {', '.join(sorted(known))}"
        )
    values: dict[str, Any] = {}
    for name, raw in data.items():
        annotation = hints[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(annotation):
            values[name] = _from_dict(annotation, raw, key)  # type: ignore[arg-type]
        else:
            values[name] = _coerce(raw, annotation, key)
    return cls(**values)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from a (partial) nested mapping; missing fields keep defaults.

    Raises:
        ConfigError: an unknown field or a value of the wrong type, named by its dotted path.
    """
    config = _from_dict(RunConfig, data, "")
    validate_config(config)
    return config


def validate_config(config: RunConfig) -> None:
    """Check value ranges that no type annotation expresses.

    Raises:
        ConfigError: naming the field and the expected range.
    """
    checks: list[tuple[bool, str]] = [
        (config.data.image_size_px >= 16, "data.image_size_px must be at least 16"),
        (config.data.batch_size >= 1, "data.batch_size must be at least 1"),
        (config.data.augment in {"paper", "light"}, "data.augment must be paper or light"),
        (config.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (0.0 <= config.model.dense_dropout < 1.0, "model.dense_dropout must be in [0, 1)"),
        (0.0 <= config.model.qpm_dropout < 1.0, "model.qpm_dropout must be in [0, 1)"),
        (config.dense.epochs >= 0, "dense.epochs must be >= 0"),
        (config.finetune.epochs >= 0, "finetune.epochs must be >= 0"),
        (config.solver.n_per_class >= 1, "solver.n_per_class must be at least 1"),
        (
            config.solver.n_features >= config.solver.n_per_class,
            "solver.n_features must be >= solver.n_per_class",
        ),
        (config.solver.time_limit_s > 0, "solver.time_limit_s must be positive"),
        (config.solver.bias_strength >= 0, "solver.bias_strength must be >= 0"),
        (
            config.solver.bias in {"locality", "locality_paper", "center", "none"},
            "solver.bias must be one of locality, locality_paper, center, none",
        ),
        (config.solver.r_scaling in {"code", "paper"}, "solver.r_scaling must be code or paper"),
    ]
    for step_name in ("dense", "finetune"):
        step = getattr(config, step_name)
        checks.append((step.step_size_epochs >= 1, f"{step_name}.step_size_epochs must be >= 1"))
        checks.append((step.lr_backbone >= 0, f"{step_name}.lr_backbone must be >= 0"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ----------------------------------------------------------------------------- files


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. solver.n_features=40")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    # YAML parsing gives numbers, booleans and null their natural types ("3" -> 3, "null" -> None).
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(config: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Return ``config`` with ``section.field=value`` overrides applied and validated.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    data = config_to_dict(config)
    for text in overrides:
        path, value = _parse_override(text)
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: depth + 1])} is not a config section"
                )
            node = node[part]
        if not isinstance(node, dict) or path[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(path)}")
        node[path[-1]] = value
    return config_from_dict(data)


def load_config(
    path: str | os.PathLike[str] | None,
    *,
    base: RunConfig | None = None,
    overrides: Iterable[str] = (),
) -> RunConfig:
    """Read a YAML file over ``base`` (default: the paper defaults), then apply overrides.

    Args:
        path: a YAML file whose sections override defaults, or None for defaults only.
        base: the configuration the file overrides.
        overrides: ``section.field=value`` strings applied last.

    Raises:
        ConfigError: the file is missing or malformed; the message names the file and field.
    """
    config = base if base is not None else RunConfig()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {file} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: expected a mapping of sections at top level")
        merged = config_to_dict(config)
        for key, value in loaded.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        try:
            config = config_from_dict(merged)
        except ConfigError as error:
            raise ConfigError(f"config file {file}: {error}") from None
    return apply_overrides(config, overrides)


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved configuration as YAML, atomically."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    atomic_write_text(Path(path), text)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- hashing

# The configuration fields each stage's output depends on (dotted paths, or "stage:<name>" for
# the hash of an upstream stage). Fields that only change speed (num_workers, device, amp) are
# left out on purpose: changing them must not invalidate finished work.
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "dense": (
        "data.dataset",
        "data.root",
        "data.crop",
        "data.image_size_px",
        "data.augment",
        "data.batch_size",
        "model.arch",
        "model.weights",
        "model.reduced_strides",
        "model.dense_dropout",
        "model.diversity_beta",
        "dense",
        "seed",
    ),
    "features": ("stage:dense",),
    "problem": (
        "stage:features",
        "solver.n_features",
        "solver.n_per_class",
        "solver.bias",
        "solver.bias_strength",
        "solver.r_scaling",
    ),
    "assignment": ("stage:problem", "solver.method", "solver.time_limit_s", "seed"),
    "finetune": ("stage:assignment", "model.qpm_dropout", "finetune"),
    "evaluate": ("stage:finetune",),
    "report": ("stage:evaluate", "report_max_classes"),
}


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_hash(config: RunConfig, stage: str, *, _cache: dict[str, str] | None = None) -> str:
    """A short hash of every configuration field ``stage`` depends on, upstream stages included.

    Two configurations give the same hash for a stage exactly when that stage would compute the
    same result, so a finished stage is reused only when its hash matches.

    Raises:
        KeyError: ``stage`` is not one of :data:`STAGE_FIELDS`.
    """
    if stage not in STAGE_FIELDS:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_FIELDS)}")
    cache = {} if _cache is None else _cache
    if stage in cache:
        return cache[stage]
    data = config_to_dict(config)
    parts: dict[str, Any] = {"stage": stage}
    for item in STAGE_FIELDS[stage]:
        if item.startswith("stage:"):
            parts[item] = stage_hash(config, item.removeprefix("stage:"), _cache=cache)
        else:
            parts[item] = _lookup(data, item)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    cache[stage] = digest
    return digest


def with_overrides(config: RunConfig, **sections: Mapping[str, Any]) -> RunConfig:
    """Return ``config`` with whole fields of sections replaced, e.g. ``solver={"n_features": 8}``."""
    updates: dict[str, Any] = {}
    for name, values in sections.items():
        current: Any = getattr(config, name)
        is_section = is_dataclass(current) and not isinstance(current, type)
        updates[name] = replace(current, **values) if is_section else values
    result = replace(config, **updates)
    validate_config(result)
    return result
