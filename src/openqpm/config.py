"""Typed, frozen run configuration; YAML in and out; typed overrides; the shipped configurations.

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
import importlib.resources
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from openqpm._io import atomic_write_text

__all__ = [
    "ConfigError",
    "DataConfig",
    "DenseConfig",
    "FinetuneConfig",
    "ModelConfig",
    "RunConfig",
    "SolverConfig",
    "SparsifyConfig",
    "apply_overrides",
    "config_description",
    "config_from_dict",
    "config_names",
    "config_to_dict",
    "demo_config",
    "field_value",
    "load_config",
    "parse_override",
    "save_config",
    "validate_config",
    "with_overrides",
]


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names the field."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are fed."""

    dataset: str = "cub"  # a name from openqpm.data.dataset_names()
    root: str = ""  # the data set folder (see README for each layout)
    # crop to the ground-truth box (where the set has boxes); None = the data set's default,
    # resolved per data set (openqpm.data._registry.resolved_crop): on for CUB, TravelingBirds and
    # the synthetic set, off for Cars, Aircraft, ImageNet and folders, as the paper runs them.
    # Stage hashes read the value as written here, so null and its resolved value hash apart.
    crop: bool | None = None
    image_size_px: int = 224  # side of the square network input
    # paper: flip, jitter, TrivialAugmentWide | light: flip, jitter | imagenet: random resized
    # crop, flip, jitter, PCA lighting; test resize 256/224 + centre crop (openqpm.data.transforms)
    augment: str = "paper"
    batch_size: int = 16  # per process; the paper uses 16 for fine-grained sets, 64 for ImageNet
    num_workers: int = 4  # DataLoader worker processes
    # share of the training split held out from all training, to calibrate prediction sets on
    # (conformal prediction, the `chiqpm` method's sets); 0: none held out, no calibrated sets
    calibration_fraction: float = 0.0
    calibration_seed: int = 0  # which training images are held out


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

    # no dense training: the pretrained model (backbone and classifier from model.weights) is
    # the dense model, as the paper does for ImageNet; the file's classifier must fit the classes
    skip: bool = False
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
    bias: str = "locality"  # a name of openqpm.constants.BIAS_NAMES
    bias_strength: float = 1.0 / math.sqrt(10.0)  # max |b| (the paper's lambda)
    r_scaling: str = "code"  # openqpm.constants.R_SCALINGS; code: (r-m)/(M-m), paper: r/M
    use_similarity: bool = True  # false: R = 0, no similarity penalty (Table 4's ablation)
    class_measure: str = "pearson"  # A from: pearson (the paper) | auroc (App. J)
    method: str = "auto"  # a name of openqpm.solver.solver_methods()
    time_limit_s: float = 60.0


@dataclass(frozen=True)
class SparsifyConfig:
    """How the dense model becomes a compact one: QPM or a baseline of the paper (Tables 2, 3).

    The baselines' values are the authors' code's (reference spec section 9).
    """

    method: str = "qpm"  # qpm | chiqpm | glm-saga5 | sldd | qsenn (openqpm.stages.METHODS)
    max_images: int = 100_000  # training images the glm fits read (a seeded sample beyond)
    selection_alpha: float = 0.8  # elastic-net mixing of the group-sparse feature selection
    fit_alpha: float = 0.99  # elastic-net mixing of the sparse layer's path
    n_lambdas: int = 100  # lambdas of each path, log-spaced from lambda_max down
    lambda_min_ratio: float = 1e-3  # the path's last lambda / lambda_max
    qsenn_rounds: int = 4  # Q-SENN: rounds of fit, quantise, fine-tune
    qsenn_round_epochs: int = 10  # epochs of every round but the last (that one: finetune.epochs)
    qsenn_lr_decay: float = 0.9  # round k fine-tunes at finetune.lr_backbone * decay**k
    # CHiQPM (the authors' NeurIPS 2025 follow-up): the round(rho * n_classes) class pairs with the
    # closest dense weight rows must share all but one feature
    chiqpm_rho: float = 0.5
    chiqpm_grounding_weight: float = 3.0  # weight of the feature grounding loss in fine-tuning
    # epochs with the grounding loss; None: the first 3/4 of finetune.epochs (the authors' 30 of 40)
    chiqpm_grounding_epochs: int | None = None
    chiqpm_remaining_factor: float = 2.0  # the authors' factor on the unassigned features' mean


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; the resolved copy is saved as ``config.yaml``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    seed: int = 0  # seeds data order, initialisation, the solver and the metrics
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # mixed precision (CUDA only). Off by default: the paper trains in fp32, and autocast changes
    # the numbers (the trained weights, hence the features the solver reads), so only fp32 runs
    # are comparable to the paper's; turn it on for speed, not for reproductions.
    amp: bool = False
    report_max_classes: int | None = None  # limit the HTML report to the first N classes


_T = TypeVar("_T")


def resolved_reduced_strides(model: ModelConfig) -> bool:
    """``model.reduced_strides``, with None meaning: on for ResNets (as the paper), off otherwise."""
    if model.reduced_strides is None:
        return model.arch in {"resnet18", "resnet34", "resnet50"}
    return model.reduced_strides


def demo_config() -> RunConfig:
    """The configuration of ``openqpm demo``: the embedded data set, a small CNN, CPU-sized.

    It is the shipped configuration ``demo`` (``openqpm configs`` lists them all).
    """
    return load_config("demo")


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
        if not isinstance(value, str):
            # YAML reads `root: 2024_01` as a number and `root: no` as false: say so, never guess
            raise ConfigError(f"{where}: expected a string, got {value!r} (quote it in YAML)")
        return value
    return value


def field_value(config: RunConfig, dotted: str) -> Any:
    """The value of a dotted field (``"solver.n_features"``) or a whole section, as plain data."""
    node: Any = config_to_dict(config)
    for part in dotted.split("."):
        node = node[part]
    return node


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

    Names chosen from a list (data set, backbone, solver method, bias, ...) are checked against
    the list their module owns by :func:`openqpm.pipeline.check_inputs`, before any work.

    Raises:
        ConfigError: naming the field and the expected range.
    """
    checks: list[tuple[bool, str]] = [
        (config.data.image_size_px >= 16, "data.image_size_px must be at least 16"),
        (config.data.batch_size >= 1, "data.batch_size must be at least 1"),
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
        (config.sparsify.max_images >= 2, "sparsify.max_images must be at least 2"),
        (0 < config.sparsify.selection_alpha <= 1, "sparsify.selection_alpha must be in (0, 1]"),
        (0 < config.sparsify.fit_alpha <= 1, "sparsify.fit_alpha must be in (0, 1]"),
        (config.sparsify.n_lambdas >= 2, "sparsify.n_lambdas must be at least 2"),
        (0 < config.sparsify.lambda_min_ratio < 1, "sparsify.lambda_min_ratio must be in (0, 1)"),
        (config.sparsify.qsenn_rounds >= 1, "sparsify.qsenn_rounds must be at least 1"),
        (config.sparsify.qsenn_round_epochs >= 0, "sparsify.qsenn_round_epochs must be >= 0"),
        (0 < config.sparsify.qsenn_lr_decay <= 1, "sparsify.qsenn_lr_decay must be in (0, 1]"),
        (
            0.0 <= config.data.calibration_fraction < 1.0,
            "data.calibration_fraction must be in [0, 1) (e.g. 0.1)",
        ),
        (config.data.calibration_seed >= 0, "data.calibration_seed must be >= 0"),
        (config.sparsify.chiqpm_rho >= 0, "sparsify.chiqpm_rho must be >= 0"),
        (
            config.sparsify.chiqpm_grounding_weight >= 0,
            "sparsify.chiqpm_grounding_weight must be >= 0",
        ),
        (
            config.sparsify.chiqpm_grounding_epochs is None
            or config.sparsify.chiqpm_grounding_epochs >= 0,
            "sparsify.chiqpm_grounding_epochs must be >= 0 (or null: 3/4 of finetune.epochs)",
        ),
    ]
    for step_name in ("dense", "finetune"):
        step = getattr(config, step_name)
        checks.append((step.step_size_epochs >= 1, f"{step_name}.step_size_epochs must be >= 1"))
        checks.append((step.lr_backbone >= 0, f"{step_name}.lr_backbone must be >= 0"))
        checks.append((step.lr_head >= 0, f"{step_name}.lr_head must be >= 0"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# ----------------------------------------------------------------------------- overrides


def _field_annotation(path: list[str], text: str) -> Any:
    """The annotation of the field at ``path`` (``["solver", "n_features"]``)."""
    cls: Any = RunConfig
    for depth, part in enumerate(path):
        hints = get_type_hints(cls)
        if part not in hints:
            where = ".".join(path[: depth + 1])
            valid = ", ".join(sorted(hints))
            raise ConfigError(f"override {text!r}: unknown key {where}; valid keys here: {valid}")
        annotation = hints[part]
        if depth < len(path) - 1:
            if not is_dataclass(annotation):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(path[: depth + 1])} is not a config section"
                )
            cls = annotation
    if is_dataclass(annotation):
        raise ConfigError(f"override {text!r}: {'.'.join(path)} is a section, not a field")
    return annotation


def _is_text_field(annotation: Any) -> bool:
    return annotation is str or str(annotation).startswith("str")


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.field=value`` into the dotted key and a value of the field's type.

    The value is read as a YAML scalar (``3`` is a number, ``true`` a boolean, ``null`` None),
    except for text fields, which keep the text as written (``data.root=no`` is the folder "no",
    ``data.root=2024_01`` is "2024_01"); ``null`` still means None where the field allows it.

    Raises:
        ConfigError: no ``=``, an unknown key, or a section instead of a field.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. solver.n_features=40")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    annotation = _field_annotation(path, text)
    raw = raw.strip()
    if _is_text_field(annotation) and raw not in {"null", "~", "None"}:
        return ".".join(path), raw
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return ".".join(path), value


def apply_overrides(
    config: RunConfig, overrides: Iterable[str] | Mapping[str, Any] = ()
) -> RunConfig:
    """Return ``config`` with overrides applied and validated.

    Args:
        config: the configuration to change.
        overrides: ``"section.field=value"`` strings (parsed by :func:`parse_override`), or a
            mapping of dotted keys to typed values (``{"solver.n_features": 40}``); a value
            that is a mapping sets several fields of a section (``{"solver": {...}}``).

    Raises:
        ConfigError: an unknown key or a value of the wrong type, named by its dotted path.
    """
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [parse_override(text) for text in overrides]
    data = config_to_dict(config)
    for key, value in items:
        path = [part for part in str(key).split(".") if part]
        if isinstance(value, Mapping):
            for name, item in value.items():
                items.append((f"{key}.{name}", item))
            continue
        _field_annotation(path, f"{key}={value!r}")
        node: Any = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return config_from_dict(data)


# ----------------------------------------------------------------------------- files


def _packaged_folder() -> Any:
    # a plain data folder inside the package (not a package itself): shipped as package data
    return importlib.resources.files("openqpm").joinpath("configs")


def config_names() -> list[str]:
    """The configurations shipped with openqpm (``cub_resnet50``, ``demo``, ...), sorted."""
    folder = _packaged_folder()
    return sorted(
        item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml")
    )


def config_description(name: str) -> str:
    """The first comment line of a shipped configuration (what it reproduces)."""
    text = _packaged_text(name)
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _packaged_text(name: str) -> str:
    if name not in config_names():
        raise ConfigError(
            f"no configuration named {name!r}; shipped: {', '.join(config_names())} "
            "(or give the path of a YAML file)"
        )
    return str(_packaged_folder().joinpath(f"{name}.yaml").read_text("utf-8"))


def _read_source(source: str | os.PathLike[str]) -> tuple[str, str]:
    """``(text, label)`` of a YAML path or a shipped configuration's name."""
    file = Path(source)
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8"), str(file)
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {file} is not UTF-8 text ({error})") from None
        except OSError as error:
            raise ConfigError(f"config file {file} cannot be read: {error}") from None
    name = str(source)
    if file.suffix in {".yaml", ".yml"} or os.sep in name or "/" in name:
        hint = f"; shipped configurations: {', '.join(config_names())}"
        raise ConfigError(f"config file {file} does not exist{hint}")
    return _packaged_text(name), f"configuration {name!r}"


def load_config(
    source: str | os.PathLike[str] | None,
    *,
    base: RunConfig | None = None,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> RunConfig:
    """Read a YAML file or a shipped configuration over ``base``, then apply overrides.

    Args:
        source: the path of a YAML file whose sections override defaults, the name of a shipped
            configuration (:func:`config_names`, e.g. ``"cub_resnet50"``), or None for defaults.
        base: the configuration the file overrides (default: the paper's defaults).
        overrides: applied last; see :func:`apply_overrides`.

    Raises:
        ConfigError: the file or name is unknown or malformed; the message names it and the field.

    Example:
        >>> load_config("cub_resnet50", overrides={"solver.n_features": 40}).solver.n_features
        40
    """
    config = base if base is not None else RunConfig()
    if source is not None:
        text, label = _read_source(source)
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{label} is not valid YAML: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{label}: expected a mapping of sections at top level")
        merged = config_to_dict(config)
        for key, value in loaded.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged[key] = value
        try:
            config = config_from_dict(merged)
        except ConfigError as error:
            raise ConfigError(f"{label}: {error}") from None
    return apply_overrides(config, overrides)


def save_config(config: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved configuration as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))


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
