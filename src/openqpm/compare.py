"""The paper's comparison tables from finished run directories: every method, every seed.

:func:`compare` reads what ``evaluate`` wrote for each method of each run (a run directory and
its ``seed<N>`` folders), and the time each method took from the finished dense model to its final
model (Table 6), and aggregates over seeds (mean and standard deviation). :func:`markdown_table`
renders it in the paper's column order (Tables 2 and 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openqpm.config import RunConfig, apply_overrides, load_config

__all__ = [
    "COLUMNS",
    "MethodResult",
    "collect_results",
    "compare",
    "conformal_markdown",
    "html_table",
    "markdown_table",
]

# (key, header, scale): the paper's column order; fractions are shown in percent
COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("accuracy", "Accuracy", 1.0),
    ("n_features_used", "Features", 1.0),
    ("features_per_class_mean", "Per class", 1.0),
    ("features_per_class_max", "Per class (max)", 1.0),
    ("sid_at_5", "SID@5", 100.0),
    ("class_independence", "Class-Ind.", 100.0),
    ("contrastiveness", "Contrast.", 100.0),
    ("structural_grounding", "SG", 100.0),
    ("correlation", "Correlation", 100.0),
    ("sparsify_time_s", "Time (s)", 1.0),
)
_METRICS: tuple[str, ...] = (
    "sid_at_5",
    "class_independence",
    "contrastiveness",
    "structural_grounding",
    "correlation",
)


@dataclass(frozen=True)
class MethodResult:
    """One method's evaluation in one run directory (one seed)."""

    method: str
    seed: int
    run_dir: Path
    values: dict[str, float | None]
    weights_ternary: bool


def _run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path that holds a run, and the ``seed<N>`` runs inside each path."""
    found: list[Path] = []
    for path in map(Path, paths):
        candidates = [path, *sorted(path.glob("seed*"))]
        found += [p for p in candidates if (p / "config.yaml").is_file()]
    return found


def _weight_structure(model_file: Path) -> tuple[float, float, bool]:
    """``(mean, max)`` nonzero weights per class and whether the nonzero |w| are all equal."""
    from openqpm.models import load

    weights = load(model_file).class_weights().detach().double().numpy()  # (n_c, K)
    per_class = (weights != 0).sum(axis=1)
    magnitudes = np.abs(weights[weights != 0])
    ternary = bool(magnitudes.size) and bool(np.allclose(magnitudes, magnitudes[0], rtol=1e-5))
    return float(per_class.mean()), float(per_class.max()), ternary


def _method_result(run_dir: Path, config: RunConfig, state: dict[str, Any]) -> MethodResult | None:
    from openqpm.stages import model_stage, outputs_of, stage_key, stages_for

    method = config.sparsify.method
    metrics_file = run_dir / outputs_of("evaluate", config)[0]
    model_file = run_dir / outputs_of(model_stage(method).name, config)[0]
    if not metrics_file.is_file() or not model_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))[method]
    mean, most, ternary = _weight_structure(model_file)
    # Table 6: from the finished dense model to the final model
    chain = [s for s in stages_for(config) if s not in {"dense", "evaluate", "report"}]
    times = [state.get(stage_key(s, config), {}).get("summary", {}).get("time_s") for s in chain]
    values: dict[str, float | None] = {
        "accuracy": metrics.get("accuracy"),
        "n_features_used": metrics.get("n_features_used"),
        "features_per_class_mean": mean,
        "features_per_class_max": most,
        "sparsify_time_s": float(sum(times)) if all(t is not None for t in times) else None,
    }
    values.update({name: metrics.get(name) for name in _METRICS})
    values["one_feature_apart_pairs"] = metrics.get("one_feature_apart_pairs")
    for row in (metrics.get("conformal") or {}).get("results", []):
        for key in _CONFORMAL_VALUES:
            values[_conformal_key(row["score"], row["alpha"], key)] = row.get(key)
    return MethodResult(method, config.seed, run_dir, values, ternary)


# what the calibrated sets table shows per score and alpha
_CONFORMAL_VALUES = ("coverage", "mean_set_size", "empty_share", "set_coherence")


def _conformal_key(score: str, alpha: float, value: str) -> str:
    return f"conformal:{score}:{alpha:g}:{value}"


def _dense_result(run_dir: Path, config: RunConfig) -> MethodResult | None:
    from openqpm.stages import outputs_of

    metrics_file = run_dir / outputs_of("evaluate", config)[0]
    if not metrics_file.is_file():
        return None
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))["dense"]
    mean, most, _ = _weight_structure(run_dir / "dense.safetensors")
    values = {name: metrics.get(name) for name in ("accuracy", "n_features_used", *_METRICS)}
    values.update({"features_per_class_mean": mean, "features_per_class_max": most})
    values["sparsify_time_s"] = None
    return MethodResult("dense", config.seed, run_dir, values, False)


def collect_results(paths: Sequence[str | Path]) -> list[MethodResult]:
    """Every method evaluated in the given run directories (and their ``seed<N>`` runs).

    The dense model is listed once per run, as method ``dense``.
    """
    from openqpm.pipeline import read_stage_state
    from openqpm.stages import METHODS

    results: list[MethodResult] = []
    for run_dir in _run_dirs(paths):
        base = load_config(run_dir / "config.yaml")
        state = read_stage_state(run_dir)
        dense = None
        for method in METHODS:
            config = apply_overrides(base, {"sparsify.method": method})
            result = _method_result(run_dir, config, state)
            if result is not None:
                results.append(result)
                dense = dense or _dense_result(run_dir, config)
        if dense is not None:
            results.append(dense)
    return results


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    numbers = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not numbers:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(numbers)), "std": float(np.std(numbers))}


def compare(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Per method: each column's mean and standard deviation over seeds, and the seeds.

    Returns:
        ``{method: {"accuracy", "n_features_used", "features_per_class_mean",
        "features_per_class_max", "sparsify_time_s": {"mean", "std"}, "weights_ternary": bool,
        "metrics": {name: {"mean", "std"}}, "seeds": [...]}}``, methods in the paper's order
        (dense first).

    Raises:
        ValueError: no evaluated method in any of the paths.
    """
    results = collect_results(paths)
    if not results:
        raise ValueError(f"no evaluated run in {', '.join(map(str, paths))}: run `openqpm train`")
    from openqpm.stages import METHODS

    table: dict[str, Any] = {}
    for method in ("dense", *METHODS):
        rows = [r for r in results if r.method == method]
        if not rows:
            continue
        entry: dict[str, Any] = {
            key: _mean_std([r.values[key] for r in rows])
            for key, _, _ in COLUMNS
            if key not in _METRICS
        }
        entry["metrics"] = {name: _mean_std([r.values[name] for r in rows]) for name in _METRICS}
        entry["weights_ternary"] = all(r.weights_ternary for r in rows)
        entry["seeds"] = sorted({r.seed for r in rows})
        extra = sorted({k for r in rows for k in r.values if k.startswith("conformal:")})
        for key in ("one_feature_apart_pairs", *extra):
            if any(r.values.get(key) is not None for r in rows):
                entry.setdefault("sets", {})[key] = _mean_std([r.values.get(key) for r in rows])
        table[method] = entry
    return table


def conformal_markdown(comparison: dict[str, Any]) -> str | None:
    """The calibrated prediction sets of every method that has them, as a markdown table: per
    method and alpha, each score's test coverage (%) and mean set size, and the method's count of
    class pairs one feature apart (mean ± std over seeds). None when no method has them."""
    lines: list[str] = []
    for method, entry in comparison.items():
        sets = entry.get("sets", {})
        keys = [k for k in sets if k.startswith("conformal:")]
        if not keys:
            continue
        n_seeds = len(entry["seeds"])
        scores = [s for s in ("hierarchical", "aps", "thr") if any(f":{s}:" in k for k in keys)]
        alphas = sorted({float(k.split(":")[2]) for k in keys})
        if not lines:
            header = " | ".join(f"{s} coverage | {s} size" for s in scores)
            lines += [
                f"| Method | 1-apart pairs | alpha | {header} |",
                "|---|---|---|" + "---|---|" * len(scores),
            ]
        pairs = sets.get("one_feature_apart_pairs", {"mean": None, "std": None})
        for alpha in alphas:
            cells = []
            for score in scores:
                coverage = sets.get(_conformal_key(score, alpha, "coverage"), _NONE)
                size = sets.get(_conformal_key(score, alpha, "mean_set_size"), _NONE)
                cells += [_cell(coverage, 100.0, n_seeds), _cell(size, 1.0, n_seeds)]
            lines.append(
                f"| {method} | {_cell(pairs, 1.0, n_seeds)} | {alpha:g} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) if lines else None


_NONE: dict[str, float | None] = {"mean": None, "std": None}


def _cell(statistic: dict[str, float | None], scale: float, n_seeds: int) -> str:
    mean, std = statistic["mean"], statistic["std"]
    if mean is None:
        return "-"
    text = f"{scale * mean:.1f}"
    return text + (f" ± {scale * (std or 0.0):.1f}" if n_seeds > 1 else "")


def markdown_table(comparison: dict[str, Any]) -> str:
    """The comparison as a markdown table in the paper's column order (mean ± std over seeds)."""
    lines = [
        "| Method | Seeds | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for method, n_seeds, cells in _rows(comparison):
        lines.append(f"| {method} | {n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rows(comparison: dict[str, Any]) -> list[tuple[str, int, list[str]]]:
    rows = []
    for method, entry in comparison.items():
        n_seeds = len(entry["seeds"])
        cells = []
        for key, _, scale in COLUMNS:
            statistic = entry["metrics"][key] if key in _METRICS else entry[key]
            cells.append(_cell(statistic, scale, n_seeds))
        rows.append((method, n_seeds, cells))
    return rows


def html_table(comparison: dict[str, Any], *, title: str = "Comparison") -> str:
    """The comparison as a self-contained HTML page (the report's table of methods)."""
    import html

    header = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(method)}</td><td>{n}</td>"
        + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells)
        + "</tr>"
        for method, n, cells in _rows(comparison)
    )
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><table>"
        f"<tr><th>Method</th><th>Seeds</th>{header}</tr>{body}</table>"
        "<p>Mean ± standard deviation over seeds; SID@5, Class-Independence, Contrastiveness, "
        "Structural Grounding and Correlation in percent.</p></body></html>"
    )
