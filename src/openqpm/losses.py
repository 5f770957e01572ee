"""The Feature Diversity Loss (Norrenbrock et al. 2022; QPM paper appendix M) and the Feature
Grounding Loss of CHiQPM.

The diversity loss rewards the maps that the predicted class weights heavily for peaking at
different places. Semantics follow the authors' code exactly (see ``feature_diversity_loss``);
the total training loss is ``cross_entropy + feature_diversity_loss(...)`` (beta is applied
inside). CHiQPM fine-tuning adds ``weight * feature_grounding_loss(...)``, which pushes each
image's features of its true class above its other features.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DIVERSITY_BETA",
    "REFERENCE_BETA",
    "REFERENCE_REMAINING_FACTOR",
    "default_diversity_beta",
    "feature_diversity_loss",
    "feature_grounding_loss",
    "resolve_diversity_beta",
    "scaled_beta",
]

# Guards of the reference code: the class-weight row norm gets +1e-5, the largest map mean is
# clamped at 1e-6 (an all-zero sample then contributes 0 instead of NaN).
_ROW_NORM_EPS = 1e-5
_MIN_MAX_MEAN = 1e-6

# The grounding loss divides each image's difference by its largest |feature|, at least this.
_MIN_GROUNDING_SCALE = 0.01

#: The factor on the mean of the unassigned features in the authors' grounding loss: their
#: code multiplies by (1 + 1), a constant they call erroneous (with negligible effect) but kept
#: for the paper's experiments.
REFERENCE_REMAINING_FACTOR = 2.0

#: beta of the ResNets with reduced strides (28x28 maps at 224 px), paper and code.
REFERENCE_BETA = 0.196

#: Per-backbone beta. ResNets (all three: "0.196 for the Resnets", paper App. C; the reference
#: code has no resnet18 entry), Inception-v3 and Swin are the paper's values. convnext_tiny is
#: not in the paper: Swin's value, as both have 7x7 maps at 224 px and LayerNorm-based training.
#: small_cnn/tiny_cnn (8x8 maps at 64 px) use ``scaled_beta(0.196, 8, 8)``, which by the
#: scaling documented there is 0.056.
DIVERSITY_BETA: dict[str, float] = {
    "resnet18": REFERENCE_BETA,
    "resnet34": REFERENCE_BETA,
    "resnet50": REFERENCE_BETA,
    "inception_v3": 0.049,
    "swin_t": 0.0245,
    "swin_s": 0.0245,
    "convnext_tiny": 0.0245,
    "small_cnn": 0.056,
    "tiny_cnn": 0.056,
}


def feature_diversity_loss(
    feature_maps: torch.Tensor,
    logits: torch.Tensor,
    class_weights: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """The weighted Feature Diversity Loss of a batch, as the reference code computes it.

    For each sample b with predicted class c = argmax logits[b] (the prediction, not the
    label):

    * u[b, k] = |W[c, k]| / (||W[c]||_2 + 1e-5), the weight share of map k;
    * s[b, k] = a[b, k] / max(max_k a[b, k], 1e-6) with a the spatial mean of map k;
    * S[b, k, ij] = softmax_ij(M[b, k]) * s[b, k] * u[b, k] (plain spatial softmax);
    * loss = -(beta / B) * sum_b sum_ij max_k S[b, k, ij].

    Gradients reach the maps and, through u, the class weights (pass the live dense weight,
    ``model.head.weight``); the argmax itself has none.

    Args:
        feature_maps: (B, K, h, w) maps the head reads (``model.head_feature_maps(maps)``).
        logits: (B, n_c) logits of the same batch.
        class_weights: (n_c, K) weights of the head, column k for map k.
        beta: weight of the loss (``DIVERSITY_BETA[backbone]``); 0 gives exactly 0.

    Returns:
        A scalar tensor (float32, or float64 for float64 maps), <= 0.

    Raises:
        ValueError: shapes that disagree.

    Example:
        >>> maps = model.forward_features(images)
        >>> logits = model.forward_head(maps)
        >>> loss = F.cross_entropy(logits, labels) + feature_diversity_loss(
        ...     model.head_feature_maps(maps), logits, model.head.weight, beta=0.196)
    """
    if feature_maps.dim() != 4:
        raise ValueError(
            f"feature_maps must be (B, K, h, w), got shape {tuple(feature_maps.shape)}"
        )
    n_batch, n_maps, height, width = feature_maps.shape
    if logits.dim() != 2 or logits.shape[0] != n_batch:
        raise ValueError(f"logits must be ({n_batch}, n_classes), got {tuple(logits.shape)}")
    if class_weights.dim() != 2 or tuple(class_weights.shape) != (logits.shape[1], n_maps):
        raise ValueError(
            f"class_weights must be (n_classes={logits.shape[1]}, K={n_maps}) to match the "
            f"logits and maps, got {tuple(class_weights.shape)}"
        )
    # AMP may hand in half-precision maps; exp and sums need float32.
    dtype = torch.float64 if feature_maps.dtype == torch.float64 else torch.float32
    maps = feature_maps.to(dtype).reshape(n_batch, n_maps, height * width)  # (B, K, h*w)

    predicted = logits.detach().argmax(dim=1)  # (B,)
    rows = class_weights.to(dtype).index_select(0, predicted).abs()  # (B, K)
    weight_share = rows / (rows.norm(dim=1, keepdim=True) + _ROW_NORM_EPS)  # (B, K)

    map_means = maps.mean(dim=2)  # (B, K)
    largest_mean = map_means.amax(dim=1, keepdim=True).clamp(min=_MIN_MAX_MEAN)  # (B, 1)
    activation_share = map_means / largest_mean  # (B, K)
    scale = activation_share * weight_share  # (B, K)

    # softmax_ij(M) * scale = exp(M_ij - logsumexp(M) + log scale). exp is monotonic, so the
    # winning map of each position is the argmax of that exponent (found without autograd,
    # scale = 0 gives -inf and never wins over a positive scale), and the exponential is then
    # taken for the B*h*w winners only: this materialises one (B, K, h*w) tensor instead of
    # several and makes the backward pass a scatter plus the softmax term of logsumexp.
    log_normaliser = torch.logsumexp(maps, dim=2)  # (B, K)
    with torch.no_grad():
        exponent = maps + (scale.log() - log_normaliser).unsqueeze(2)  # (B, K, h*w)
        winner = exponent.argmax(dim=1)  # (B, h*w)
        del exponent  # free it before the backward pass allocates
    winner_maps = maps.gather(1, winner.unsqueeze(1)).squeeze(1)  # (B, h*w)
    winner_log_softmax = winner_maps - log_normaliser.gather(1, winner)  # (B, h*w)
    channel_max = winner_log_softmax.exp() * scale.gather(1, winner)  # (B, h*w): max_k S
    return channel_max.sum() * (-beta / n_batch)


def feature_grounding_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_feature_matrix: torch.Tensor,
    *,
    remaining_factor: float = REFERENCE_REMAINING_FACTOR,
) -> torch.Tensor:
    """The Feature Grounding Loss of CHiQPM: a batch's features of the true class should exceed
    its other features.

    For each image b with label y and a = W[y] (the class's binary row, k ones out of K):

    * m_assigned = mean of features[b] over the columns where a is 1;
    * m_rest = remaining_factor * mean of features[b] over the K - k columns where a is 0;
    * scale = max(max_j |features[b, j]|, 0.01);
    * loss_b = (m_rest - m_assigned) / scale;

    and the loss is the mean of loss_b over the batch. It falls as the assigned features rise
    and the others fall; dividing by the image's largest |feature| makes it independent of the
    features' overall size. Gradients reach ``features`` (the scale included, as in the
    authors' code), none reach the labels or the matrix.

    ``remaining_factor`` defaults to 2.0 because the authors' code multiplies m_rest by
    ``(1 + 1)``, a constant they call erroneous (with a negligible effect) but used for the
    paper's experiments; 1.0 gives the plain difference of the two means. A class row with no
    zero (k = K) gives m_rest = 0, one with no one gives m_assigned = 0 (a QPM head has neither
    when it has two or more classes).

    Args:
        features: (B, K) the head's input, e.g. ``model.forward_head(maps, pre_logits=True)``
            (for CHiQPM the rectified normalised features).
        labels: (B,) true class indices in [0, n_c).
        class_feature_matrix: (n_c, K) binary class-feature matrix, column j for feature j
            (``model.head.weight`` of a QPM head).
        remaining_factor: the factor on m_rest (see above).

    Returns:
        A scalar tensor (float32, or float64 for float64 features).

    Raises:
        ValueError: shapes that disagree (naming the argument) or a non-finite
            ``remaining_factor``.

    Example:
        >>> features = model.forward_head(maps, pre_logits=True)
        >>> logits = features @ model.head.weight.T
        >>> loss = F.cross_entropy(logits, labels) + 3.0 * feature_grounding_loss(
        ...     features, labels, model.head.weight)
    """
    if features.dim() != 2:
        raise ValueError(f"features must be (B, K), got shape {tuple(features.shape)}")
    n_batch, n_features = features.shape
    if n_batch == 0 or n_features == 0:
        raise ValueError(f"features must hold at least one value, got {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != n_batch:
        raise ValueError(
            f"labels must be ({n_batch},), one class per row of features, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if class_feature_matrix.dim() != 2 or class_feature_matrix.shape[1] != n_features:
        raise ValueError(
            f"class_feature_matrix must be (n_classes, K={n_features}) to match the features, "
            f"got {tuple(class_feature_matrix.shape)}"
        )
    if isinstance(remaining_factor, bool) or not math.isfinite(remaining_factor):
        raise ValueError(f"remaining_factor must be a finite number, got {remaining_factor!r}")
    # AMP may hand in half-precision features; the means and the division need float32.
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    values = features.to(dtype)  # (B, K)
    assigned = class_feature_matrix.detach().to(dtype).index_select(0, labels.long())  # (B, K)
    n_assigned = assigned.sum(dim=1)  # (B,)
    # an empty set's mean is 0: the sum is 0 and the count is clamped at 1
    mean_assigned = (values * assigned).sum(dim=1) / n_assigned.clamp(min=1.0)  # (B,)
    mean_rest = (values * (1.0 - assigned)).sum(dim=1) / (n_features - n_assigned).clamp(min=1.0)
    difference = float(remaining_factor) * mean_rest - mean_assigned  # (B,)
    scale = values.abs().amax(dim=1).clamp(min=_MIN_GROUNDING_SCALE)  # (B,)
    return (difference / scale).mean()


def scaled_beta(
    beta: float,
    map_height: int,
    map_width: int,
    *,
    reference_hw: tuple[int, int] = (28, 28),
) -> float:
    """Scale a beta tuned for one map size to another (the paper's "scaled with patches").

    The paper says its beta values "are scaled with the number of patches in the feature
    maps" without the rule. We assume beta grows with the square root of the number of
    patches (i.e. with the map side): this reproduces the paper's Inception-v3 value, 0.049 =
    0.196 * sqrt(7*7 / (28*28)) for 7x7 maps (Swin's 0.0245 is half of that, the largest value
    for which the paper's Swin runs converged). The reference code itself never scales.

    Args:
        beta: the value tuned at ``reference_hw``.
        map_height: h of the maps the loss will see.
        map_width: w of the maps the loss will see.
        reference_hw: the (h, w) ``beta`` was tuned for (28x28: ResNet, reduced strides, 224 px).

    Returns:
        ``beta * sqrt(map_height * map_width / (reference_hw[0] * reference_hw[1]))``.

    Raises:
        ValueError: a non-positive size or a negative beta.

    Example:
        >>> round(scaled_beta(0.196, 7, 7), 4)
        0.049
    """
    sizes = (map_height, map_width, *reference_hw)
    if any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in sizes):
        raise ValueError(f"map sizes must be positive integers, got {sizes}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    n_patches = map_height * map_width
    n_reference_patches = reference_hw[0] * reference_hw[1]
    return float(beta) * math.sqrt(n_patches / n_reference_patches)


def default_diversity_beta(
    backbone_name: str, *, map_height: int | None = None, map_width: int | None = None
) -> float:
    """The beta for a backbone: its ``DIVERSITY_BETA`` entry, else 0.196 scaled to the maps.

    Args:
        backbone_name: a registry name (``timm:...`` names have no entry).
        map_height: h of the maps, needed only for backbones without an entry.
        map_width: w of the maps, likewise.

    Returns:
        beta.

    Raises:
        ValueError: no entry and no map size given.
    """
    if backbone_name in DIVERSITY_BETA:
        return DIVERSITY_BETA[backbone_name]
    if map_height is None or map_width is None:
        raise ValueError(
            f"no diversity beta known for backbone {backbone_name!r} (known: "
            f"{', '.join(sorted(DIVERSITY_BETA))}); give the map size to scale 0.196, "
            "or set the beta explicitly"
        )
    return scaled_beta(REFERENCE_BETA, map_height, map_width)


def resolve_diversity_beta(
    arch: str, *, override: float | None, reduced_strides: bool, image_size_px: int
) -> float:
    """The beta a run trains with: the override, else the tabulated value, else a scaled one.

    Backbones without a ``DIVERSITY_BETA`` entry (``timm:`` models) get 0.196 scaled to the size
    of their maps at ``image_size_px`` (see :func:`scaled_beta`); the backbone is built (with
    random weights, no download) only in that case, to measure its maps.

    Args:
        arch: the backbone's registry name.
        override: a beta set explicitly (the run's ``diversity_beta``); returned as given.
        reduced_strides: whether the backbone runs with reduced strides (changes its map size).
        image_size_px: the side of the training images.

    Returns:
        beta.

    Raises:
        ValueError: an unknown backbone or an image size it does not accept (only when the
            beta has to be scaled).

    Example:
        >>> resolve_diversity_beta("resnet50", override=None, reduced_strides=True,
        ...                        image_size_px=224)
        0.196
    """
    if override is not None:
        return float(override)
    if arch in DIVERSITY_BETA:
        return float(DIVERSITY_BETA[arch])
    # imported here: openqpm.models imports torchvision and must not load with the losses
    from openqpm.models.backbones import create_backbone

    backbone = create_backbone(arch, reduced_strides=reduced_strides)
    height, width = backbone.feature_map_size(image_size_px)
    return float(default_diversity_beta(arch, map_height=height, map_width=width))
