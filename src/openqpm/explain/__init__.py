"""Explanations of a QPM: global (classes, features, contrastive pairs), examples, heatmaps,
figures and the static HTML report.

Submodules are imported on first use so that ``import openqpm.explain`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from openqpm._lazy import lazy_exports

__all__ = [
    "ContrastivePair",
    "DatasetScan",
    "GlobalExplanation",
    "LocalExplanation",
    "assign_feature_colors",
    "choose_example",
    "class_comparison_figure",
    "composite_overlay",
    "display_image",
    "explain_image",
    "heatmap_overlay",
    "hierarchical_explanation",
    "hierarchy_figure",
    "local_explanation_figure",
    "scan_dataset",
    "top_activating",
    "write_report",
]

_LAZY = {
    "ContrastivePair": "openqpm.explain.global_",
    "GlobalExplanation": "openqpm.explain.global_",
    "DatasetScan": "openqpm.explain.examples",
    "choose_example": "openqpm.explain.examples",
    "scan_dataset": "openqpm.explain.examples",
    "top_activating": "openqpm.explain.examples",
    "assign_feature_colors": "openqpm.explain.heatmaps",
    "composite_overlay": "openqpm.explain.heatmaps",
    "display_image": "openqpm.explain.heatmaps",
    "heatmap_overlay": "openqpm.explain.heatmaps",
    "hierarchical_explanation": "openqpm.explain.hierarchy",
    "hierarchy_figure": "openqpm.explain.hierarchy",
    "LocalExplanation": "openqpm.explain.figures",
    "class_comparison_figure": "openqpm.explain.figures",
    "explain_image": "openqpm.explain.figures",
    "local_explanation_figure": "openqpm.explain.figures",
    "write_report": "openqpm.explain.report",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from openqpm.explain.examples import DatasetScan, choose_example, scan_dataset, top_activating
    from openqpm.explain.figures import (
        LocalExplanation,
        class_comparison_figure,
        explain_image,
        local_explanation_figure,
    )
    from openqpm.explain.global_ import ContrastivePair, GlobalExplanation
    from openqpm.explain.heatmaps import (
        assign_feature_colors,
        composite_overlay,
        display_image,
        heatmap_overlay,
    )
    from openqpm.explain.hierarchy import hierarchical_explanation, hierarchy_figure
    from openqpm.explain.report import write_report


__getattr__, __dir__ = lazy_exports("openqpm.explain", globals(), _LAZY, __all__)
