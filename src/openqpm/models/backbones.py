"""Backbones: networks that turn images into non-negative feature maps (B, n_f, h, w).

Every backbone is built from a registry by name (:func:`create_backbone`), never downloads
anything, and takes pretrained weights only from a local file. The registry holds the
torchvision networks the QPM paper uses (ResNet-18/34/50 with the optional reduced strides,
Inception-v3, Swin-T/S), ConvNeXt-T, any ``timm:<name>`` model when timm is installed, and two
small CNNs (``small_cnn`` for the CPU demo, ``tiny_cnn`` for unit tests).

Example:
    >>> backbone = create_backbone("tiny_cnn")
    >>> backbone(torch.zeros(2, 3, 64, 64)).shape
    torch.Size([2, 32, 8, 8])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from openqpm._io import eval_mode

_logger = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "backbone_names",
    "check_image_size",
    "check_n_features",
    "create_backbone",
    "register_backbone",
]

BackboneFactory = Callable[..., "Backbone"]

_REGISTRY: dict[str, BackboneFactory] = {}
_TIMM_PREFIX = "timm:"
# Number of key names quoted in a key-mismatch error: enough to see the pattern, short to read.
_N_KEYS_QUOTED = 5


class Backbone(nn.Module):
    """Base class of all backbones: ``forward(images)`` returns non-negative maps (B, n_f, h, w).

    Attributes:
        name: the registry name the backbone was built with.
        n_features: n_f, the number of channels of the feature maps.
        default_image_size_px: the image side the architecture is meant for.
        min_image_size_px: the smallest image side the architecture accepts.
        reduced_strides: whether the last stages run with stride 1 (ResNets only).
        weights_hint: the pretrained file a user would normally pass, and where to get it.
        ignored_weight_prefixes: checkpoint keys under these prefixes (classifiers) are skipped
            when loading weights.
        classifier_keys: the ``(weight, bias)`` keys of the published linear classifier in a
            weights file when that classifier reads this backbone's pooled maps as they are
            (ResNets, Inception-v3: ``fc``), so it can serve as the dense head
            (:meth:`read_classifier`); None otherwise (Swin's and ConvNeXt's classifiers read
            their features before the ReLU these backbones add).
    """

    name: str = ""
    n_features: int = 0
    default_image_size_px: int = 224
    min_image_size_px: int = 32
    reduced_strides: bool = False
    weights_hint: str = "no published weights: train from scratch"
    ignored_weight_prefixes: tuple[str, ...] = ()
    classifier_keys: tuple[str, str] | None = None

    def options(self) -> dict[str, Any]:
        """Construction options beyond name and strides that a saved model must restore.

        Returns:
            A JSON-serialisable dict, empty for most backbones; :meth:`set_options` accepts it.
        """
        return {}

    def set_options(self, **options: Any) -> None:
        """Apply options recorded by :meth:`options` (used when a saved model is loaded).

        Raises:
            ValueError: an option this backbone does not know.
        """
        if options:
            raise ValueError(
                f"backbone {self.name!r} takes no options, got {sorted(options)}; "
                "the file was probably written by a newer openqpm"
            )

    def dense_training_changes(self) -> dict[str, Any]:
        """The options :meth:`after_dense_training` would set now; empty for most backbones."""
        return {}

    def after_dense_training(self) -> dict[str, Any]:
        """Change the architecture as the paper does once dense training is over.

        Nothing for most backbones; the Swin transformers drop their final LayerNorm (paper
        App. C). The change goes through :meth:`set_options`, so a saved model reloads with it.

        Returns:
            The options changed (empty when nothing changed).
        """
        changes = self.dense_training_changes()
        if changes:
            self.set_options(**changes)
        return changes

    def read_classifier(self, weights_path: str | Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The published linear classifier in a weights file, to use as the dense head.

        Reads the file as :meth:`load_weights` does (``.safetensors`` or a weights-only torch
        state dict, ``module.`` prefixes stripped) and returns the tensors under
        :attr:`classifier_keys` as they are; the caller checks their shapes.

        Args:
            weights_path: the file.

        Returns:
            ``(weight, bias)``, normally of shapes (n_c, n_f) and (n_c,); None when this
            backbone has no classifier that reads its maps as they are, or the file has none.

        Raises:
            FileNotFoundError: the file does not exist.
            ValueError: the file is not a state dict.
        """
        if self.classifier_keys is None:
            return None
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file '{path}' not found")
        state = {
            key.removeprefix("module."): value for key, value in _read_state_dict(path).items()
        }
        weight_key, bias_key = self.classifier_keys
        if weight_key not in state or bias_key not in state:
            return None
        return state[weight_key], state[bias_key]

    def check_image_size(self, image_size_px: int) -> None:
        """Fail early when images of this side length cannot go through the backbone.

        Args:
            image_size_px: side length of the (square) input images in pixels.

        Raises:
            TypeError: the size is not an integer.
            ValueError: the size is below ``min_image_size_px``.
        """
        if isinstance(image_size_px, bool) or not isinstance(image_size_px, int):
            raise TypeError(
                f"image size must be an integer number of pixels, got {image_size_px!r}"
            )
        if image_size_px < self.min_image_size_px:
            raise ValueError(
                f"image size {image_size_px} px is too small for backbone {self.name!r}: "
                f"it needs at least {self.min_image_size_px} px "
                f"(default {self.default_image_size_px} px)"
            )

    def feature_map_size(self, image_size_px: int) -> tuple[int, int]:
        """The (h, w) of the feature maps for square images of the given side.

        Computed by a shape-only forward pass on the meta device (no arithmetic, no memory).

        Args:
            image_size_px: side length of the input images in pixels.

        Returns:
            The map height and width.

        Raises:
            ValueError: the image size is too small for this backbone.
        """
        self.check_image_size(image_size_px)
        return self._meta_forward(image_size_px)

    def _meta_forward(self, image_size_px: int) -> tuple[int, int]:
        """Map (h, w) from a forward pass on the meta device: shapes only, no arithmetic."""
        tensors = {
            name: torch.empty_like(value, device="meta")
            for name, value in [*self.named_parameters(), *self.named_buffers()]
        }
        images = torch.empty(1, 3, image_size_px, image_size_px, device="meta")
        with eval_mode(self), torch.no_grad():
            maps = torch.func.functional_call(self, tensors, (images,))
        return int(maps.shape[2]), int(maps.shape[3])

    def load_weights(self, weights_path: str | Path) -> None:
        """Load pretrained weights from a local file (no download, no pickle).

        Accepts a ``.safetensors`` file or a torchvision/timm ``.pth`` state dict (read with
        ``torch.load(weights_only=True)``). Classifier keys are ignored, a ``module.`` prefix
        (DataParallel) is stripped; any other missing or unexpected key is an error.

        Args:
            weights_path: the file.

        Raises:
            FileNotFoundError: the file does not exist; the message names the expected file.
            ValueError: the file is not a state dict, or its keys or shapes do not match.
        """
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained weights for backbone {self.name!r} not found at '{path}'. "
                f"Expected: {self.weights_hint}. openqpm never downloads weights; "
                "place the file there or pass no weights to train from scratch."
            )
        state = _read_state_dict(path)
        state = self._map_weight_keys(state)
        own = self.state_dict()
        # Old torchvision checkpoints predate BatchNorm's counter; BatchNorm fills it in itself.
        missing = [
            key for key in own if key not in state and not key.endswith("num_batches_tracked")
        ]
        unexpected = [key for key in state if key not in own]
        if missing or unexpected:
            raise ValueError(
                f"weights file '{path}' does not fit backbone {self.name!r} "
                f"(reduced_strides={self.reduced_strides}): "
                f"{len(missing)} missing keys {missing[:_N_KEYS_QUOTED]}, "
                f"{len(unexpected)} unexpected keys {unexpected[:_N_KEYS_QUOTED]}. "
                f"Expected: {self.weights_hint}"
            )
        wrong_shapes = [
            f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            for key, value in state.items()
            if tuple(value.shape) != tuple(own[key].shape)
        ]
        if wrong_shapes:
            raise ValueError(
                f"weights file '{path}' has {len(wrong_shapes)} tensors of the wrong shape for "
                f"backbone {self.name!r}: {wrong_shapes[:_N_KEYS_QUOTED]}"
            )
        self.load_state_dict(state, strict=True)
        _logger.info("loaded %d weight tensors into %s from %s", len(state), self.name, path)

    def _map_weight_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename checkpoint keys to this module's names and drop classifier keys."""
        mapped: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            key = key.removeprefix("module.")
            if key.startswith(self.ignored_weight_prefixes):
                continue
            mapped[key] = value
        return mapped


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict from a .safetensors or a weights-only torch file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"'{path}' is not a readable safetensors file: {error}") from error
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"'{path}' could not be read as a weights-only torch state dict "
            f"(openqpm never unpickles arbitrary objects): {error}"
        ) from error
    # Training checkpoints often wrap the weights; accept the usual wrappers.
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ValueError(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    return dict(loaded)


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding a backbone factory to the registry.

    The factory is called as ``factory(reduced_strides=...)`` and returns a :class:`Backbone`.

    Args:
        name: the registry name; must be new and must not start with ``timm:``.

    Returns:
        The decorator, which returns the factory unchanged.

    Raises:
        ValueError: the name is taken or reserved.

    Example:
        >>> @register_backbone("my_net")
        ... def _my_net(*, reduced_strides: bool = False) -> Backbone: ...
    """
    if name in _REGISTRY or name.startswith(_TIMM_PREFIX):
        raise ValueError(f"backbone name {name!r} is already registered or reserved")

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def backbone_names() -> list[str]:
    """The registered backbone names, sorted (``timm:<name>`` works in addition with timm)."""
    return sorted(_REGISTRY)


def create_backbone(
    name: str, *, weights_path: str | Path | None = None, reduced_strides: bool = False
) -> Backbone:
    """Build a backbone by name, optionally with pretrained weights from a local file.

    Args:
        name: a name from :func:`backbone_names`, or ``timm:<model name>`` (needs timm).
        weights_path: a local ``.pth`` state dict (torchvision V1 checkpoints for the ResNets,
            e.g. ``resnet50-0676ba61.pth`` or the older ``resnet50-19c8e357.pth``) or a
            ``.safetensors`` file; None for random initialisation.
        reduced_strides: stride 1 instead of 2 in the last two stages (ResNets only), as
            PIP-Net and QPM do: 28x28 maps at 224 px instead of 7x7.

    Returns:
        The backbone in training mode on the CPU.

    Raises:
        ValueError: unknown name (the message lists the valid ones), reduced strides asked of a
            backbone without them, or weights that do not fit.
        FileNotFoundError: ``weights_path`` does not exist.
        ImportError: a ``timm:`` name without timm installed.

    Example:
        >>> backbone = create_backbone("resnet50", reduced_strides=True)
        >>> backbone.feature_map_size(224)
        (28, 28)
    """
    if name.startswith(_TIMM_PREFIX):
        backbone = _create_timm_backbone(name[len(_TIMM_PREFIX) :], reduced_strides=reduced_strides)
    else:
        factory = _REGISTRY.get(name)
        if factory is None:
            raise ValueError(
                f"unknown backbone {name!r}; valid names: {', '.join(backbone_names())}, "
                "or 'timm:<model name>' with timm installed (pip install 'openqpm[timm]')"
            )
        backbone = factory(reduced_strides=reduced_strides)
    if weights_path is not None:
        backbone.load_weights(weights_path)
    return backbone


def check_image_size(backbone: Backbone, image_size_px: int) -> None:
    """Fail early when ``backbone`` cannot take images of this side length.

    Args:
        backbone: the backbone.
        image_size_px: side length of the input images in pixels.

    Raises:
        TypeError: the size is not an integer.
        ValueError: the size is below the backbone's ``min_image_size_px``.
    """
    backbone.check_image_size(image_size_px)


def check_n_features(backbone: Backbone, n_features: int) -> None:
    """Fail early when more features are requested than the backbone has channels.

    Args:
        backbone: the backbone.
        n_features: the number of features the QPM should select (n_f*).

    Raises:
        ValueError: ``n_features`` is not a positive integer or exceeds ``backbone.n_features``.
    """
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features must be a positive integer, got {n_features!r}")
    if n_features > backbone.n_features:
        raise ValueError(
            f"n_features={n_features} is larger than the {backbone.n_features} feature channels "
            f"of backbone {backbone.name!r}; choose n_features <= {backbone.n_features}"
        )


def _no_reduced_strides(name: str, reduced_strides: bool) -> None:
    if reduced_strides:
        raise ValueError(
            f"reduced_strides is only available for resnet18/34/50, not for backbone {name!r}"
        )


# --------------------------------------------------------------------------------------------
# torchvision ResNets


_RESNET_WEIGHTS = {
    "resnet18": "resnet18-f37072fd.pth (or the older resnet18-5c106cde.pth), torchvision "
    "ResNet18_Weights.IMAGENET1K_V1: https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth (or the older resnet34-333f7ec4.pth), torchvision "
    "ResNet34_Weights.IMAGENET1K_V1: https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth (or the older resnet50-19c8e357.pth), torchvision "
    "ResNet50_Weights.IMAGENET1K_V1 (V1, not V2, as the QPM paper): "
    "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}


class ResNetBackbone(Backbone):
    """A torchvision ResNet without its pooling and classifier.

    The stem and the four stages keep torchvision's attribute names, so torchvision
    checkpoints load key for key (``fc.*`` is ignored). The last block ends in a ReLU, so the
    maps are non-negative.
    """

    ignored_weight_prefixes = ("fc.",)
    classifier_keys = ("fc.weight", "fc.bias")

    def __init__(self, name: str, *, reduced_strides: bool = False) -> None:
        super().__init__()
        import torchvision

        network = getattr(torchvision.models, name)(weights=None)
        self.name = name
        self.reduced_strides = reduced_strides
        self.weights_hint = _RESNET_WEIGHTS[name]
        self.default_image_size_px = 224
        self.min_image_size_px = 32
        self.conv1 = network.conv1
        self.bn1 = network.bn1
        self.relu = network.relu
        self.maxpool = network.maxpool
        self.layer1 = network.layer1
        self.layer2 = network.layer2
        self.layer3 = network.layer3
        self.layer4 = network.layer4
        self.n_features = int(network.fc.in_features)
        if reduced_strides:
            # PIP-Net/QPM: no downsampling in the last two stages. Only the first block of a
            # stage strides (conv1 in BasicBlock, conv2 in torchvision's Bottleneck, and the
            # 1x1 downsample conv); no dilation is added, as in the reference.
            for stage in (self.layer3, self.layer4):
                for module in stage[0].modules():
                    if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                        module.stride = (1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, n_f, h, w) of normalised images (B, 3, H, W)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer2(self.layer1(x))
        return self.layer4(self.layer3(x))


@register_backbone("resnet18")
def _resnet18(*, reduced_strides: bool = False) -> Backbone:
    return ResNetBackbone("resnet18", reduced_strides=reduced_strides)


@register_backbone("resnet34")
def _resnet34(*, reduced_strides: bool = False) -> Backbone:
    return ResNetBackbone("resnet34", reduced_strides=reduced_strides)


@register_backbone("resnet50")
def _resnet50(*, reduced_strides: bool = False) -> Backbone:
    return ResNetBackbone("resnet50", reduced_strides=reduced_strides)


# --------------------------------------------------------------------------------------------
# torchvision Inception-v3

_INCEPTION_LAYERS = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
)


class InceptionV3Backbone(Backbone):
    """torchvision Inception-v3 up to ``Mixed_7c`` (2048 maps, 8x8 at 299 px), no aux logits.

    Images are expected normalised with the data set's mean/std (torchvision's
    ``transform_input`` is off). Every branch ends in a ReLU, so the maps are non-negative.
    """

    ignored_weight_prefixes = ("fc.", "AuxLogits.")
    classifier_keys = ("fc.weight", "fc.bias")

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        network = torchvision.models.inception_v3(
            weights=None, aux_logits=False, init_weights=True, transform_input=False
        )
        self.name = "inception_v3"
        self.n_features = int(network.fc.in_features)
        self.default_image_size_px = 299
        self.min_image_size_px = 75
        self.weights_hint = (
            "inception_v3_google-0cc3c7bd.pth, torchvision Inception_V3_Weights.IMAGENET1K_V1: "
            "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
        )
        for layer_name in _INCEPTION_LAYERS:
            setattr(self, layer_name, getattr(network, layer_name))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, 2048, h, w) of normalised images (B, 3, H, W)."""
        x = images
        for layer_name in _INCEPTION_LAYERS:
            x = getattr(self, layer_name)(x)
        return x


@register_backbone("inception_v3")
def _inception_v3(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("inception_v3", reduced_strides)
    return InceptionV3Backbone()


# --------------------------------------------------------------------------------------------
# torchvision Swin transformers and ConvNeXt

_SWIN_WEIGHTS = {
    "swin_t": "swin_t-704ceda3.pth, torchvision Swin_T_Weights.IMAGENET1K_V1: "
    "https://download.pytorch.org/models/swin_t-704ceda3.pth",
    "swin_s": "swin_s-5e29d889.pth, torchvision Swin_S_Weights.IMAGENET1K_V1: "
    "https://download.pytorch.org/models/swin_s-5e29d889.pth",
}


class SwinBackbone(Backbone):
    """A torchvision Swin transformer: last-stage tokens as maps (7x7 at 224 px).

    The tokens go through the final LayerNorm (as in the classifier path), are permuted from
    NHWC to NCHW and pass a ReLU, because QPM needs non-negative maps. The paper switches the
    final LayerNorm off after dense training ("ensuring more unrelated features"):
    :meth:`after_dense_training` (which the pipeline's ``dense`` stage calls) does that through
    ``set_options(final_norm=False)``, which is recorded when the model is saved.
    """

    ignored_weight_prefixes = ("head.",)

    def __init__(self, name: str) -> None:
        super().__init__()
        import torchvision

        network = getattr(torchvision.models, name)(weights=None)
        self.name = name
        self.n_features = int(network.head.in_features)
        self.default_image_size_px = 224
        self.min_image_size_px = 32
        self.weights_hint = _SWIN_WEIGHTS[name]
        self.features = network.features
        self.norm: nn.Module = network.norm
        self.final_norm = True

    def options(self) -> dict[str, Any]:
        """``{"final_norm": bool}``: whether the final LayerNorm is applied."""
        return {"final_norm": self.final_norm}

    def set_options(self, *, final_norm: bool = True, **options: Any) -> None:
        """Switch the final LayerNorm off (``final_norm=False``); it cannot be switched back on.

        Raises:
            ValueError: an unknown option, or ``final_norm=True`` after it was removed.
        """
        super().set_options(**options)
        if final_norm == self.final_norm:
            return
        if final_norm:
            raise ValueError(f"the final LayerNorm of {self.name!r} was removed; build a new one")
        # Identity keeps the forward unchanged; the LayerNorm's parameters leave the state dict.
        self.norm = nn.Identity()
        self.final_norm = False

    def dense_training_changes(self) -> dict[str, Any]:
        """``{"final_norm": False}`` (the paper drops the final LayerNorm after dense training),
        or ``{}`` when it was dropped already."""
        return {"final_norm": False} if self.final_norm else {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, n_f, h, w) of normalised images (B, 3, H, W)."""
        tokens = self.norm(self.features(images))  # (B, h, w, n_f): torchvision Swin is NHWC
        return F.relu(tokens.permute(0, 3, 1, 2))  # (B, n_f, h, w)


@register_backbone("swin_t")
def _swin_t(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("swin_t", reduced_strides)
    return SwinBackbone("swin_t")


@register_backbone("swin_s")
def _swin_s(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("swin_s", reduced_strides)
    return SwinBackbone("swin_s")


class ConvNeXtBackbone(Backbone):
    """torchvision ConvNeXt-T: last-stage maps (768, 7x7 at 224 px) through a ReLU.

    ConvNeXt's own classifier normalises after pooling, so per-position maps are taken before
    it; the ReLU makes them non-negative as QPM needs.
    """

    ignored_weight_prefixes = ("classifier.",)

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        network = torchvision.models.convnext_tiny(weights=None)
        self.name = "convnext_tiny"
        self.n_features = int(network.classifier[-1].in_features)
        self.default_image_size_px = 224
        self.min_image_size_px = 32
        self.weights_hint = (
            "convnext_tiny-983f1562.pth, torchvision ConvNeXt_Tiny_Weights.IMAGENET1K_V1: "
            "https://download.pytorch.org/models/convnext_tiny-983f1562.pth"
        )
        self.features = network.features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, 768, h, w) of normalised images (B, 3, H, W)."""
        return F.relu(self.features(images))


@register_backbone("convnext_tiny")
def _convnext_tiny(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("convnext_tiny", reduced_strides)
    return ConvNeXtBackbone()


# --------------------------------------------------------------------------------------------
# timm


class TimmBackbone(Backbone):
    """Any timm model's ``forward_features`` as NCHW maps through a ReLU.

    NHWC outputs (timm's Swin and friends) are permuted; token outputs (B, N, C) of ViT-like
    models drop their prefix tokens and are folded into the square patch grid. The ReLU is an
    identity for networks that already end in one (ResNets) and makes the others non-negative.
    """

    ignored_weight_prefixes = ("fc.", "head.", "classifier.", "head_dist.", "aux_head.")

    def __init__(self, model_name: str) -> None:
        super().__init__()
        try:
            import timm
        except ImportError as error:
            raise ImportError(
                f"backbone 'timm:{model_name}' needs timm: pip install 'openqpm[timm]'"
            ) from error
        if not timm.is_model(model_name):
            raise ValueError(
                f"timm has no model {model_name!r}; see timm.list_models() for the valid names"
            )
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0)
        self.name = f"{_TIMM_PREFIX}{model_name}"
        self.n_features = int(self.model.num_features)
        config = getattr(self.model, "pretrained_cfg", None) or {}
        input_size = config.get("input_size", (3, 224, 224))
        self.default_image_size_px = int(input_size[-1])
        self.min_image_size_px = 32
        self.weights_hint = (
            f"a state dict of timm model {model_name!r} (.safetensors or .pth), e.g. the "
            "model.safetensors of its Hugging Face Hub repository, downloaded beforehand"
        )
        self.n_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    def check_image_size(self, image_size_px: int) -> None:
        """Fail early when the timm model cannot take this size (some fix their input size).

        Raises:
            TypeError: the size is not an integer.
            ValueError: the size is too small, or the model refuses it (timm's message).
        """
        self.feature_map_size(image_size_px)

    def feature_map_size(self, image_size_px: int) -> tuple[int, int]:
        """The (h, w) of the feature maps for square images of the given side.

        Raises:
            TypeError: the size is not an integer.
            ValueError: the size is too small, or the model refuses it (timm's message).
        """
        Backbone.check_image_size(self, image_size_px)
        try:
            return self._meta_forward(image_size_px)
        except Exception as error:  # timm raises assertion and runtime errors alike
            raise ValueError(
                f"backbone {self.name!r} cannot take {image_size_px} px images: {error}"
            ) from error

    def _map_weight_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # timm checkpoints name the network's own keys; ours sit under "model.".
        return {f"model.{key}": value for key, value in super()._map_weight_keys(state).items()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, n_f, h, w) of normalised images (B, 3, H, W)."""
        output = self.model.forward_features(images)
        if output.dim() == 3:  # (B, N, C) tokens
            tokens = output[:, self.n_prefix_tokens :]  # (B, h*w, C)
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(
                    f"{self.name} returned {tokens.shape[1]} patch tokens, not a square grid"
                )
            output = tokens.transpose(1, 2).reshape(
                tokens.shape[0], tokens.shape[2], side, side
            )  # (B, C, h, w)
        elif output.shape[1] != self.n_features and output.shape[-1] == self.n_features:
            output = output.permute(0, 3, 1, 2)  # NHWC (B, h, w, C) -> (B, C, h, w)
        return F.relu(output)


def _create_timm_backbone(model_name: str, *, reduced_strides: bool) -> Backbone:
    _no_reduced_strides(f"{_TIMM_PREFIX}{model_name}", reduced_strides)
    return TimmBackbone(model_name)


# --------------------------------------------------------------------------------------------
# Small CNNs for the CPU demo and the tests


def _conv_bn_relu(n_in: int, n_out: int, *, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(n_out),
        nn.ReLU(inplace=True),
    )


class _ResidualBlock(nn.Module):
    """ResNet's basic block with stride 2: two 3x3 conv-bn, a 1x1 projection shortcut, ReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(n_out)
        self.shortcut = nn.Sequential(
            nn.Conv2d(n_in, n_out, 1, stride=2, bias=False), nn.BatchNorm2d(n_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(residual + self.shortcut(x))


class SmallCNN(Backbone):
    """A small network with total stride 8 (8x8 maps at 64 px) for CPU training from scratch.

    A stride-2 conv-bn-relu stem, then one stride-2 stage per entry of ``stage_channels``
    (a residual basic block if ``residual``, else a conv-bn-relu), then a 1x1 conv-bn-relu to
    ``n_features`` channels, so the maps end in a ReLU and are non-negative.

    ``small_cnn`` (stem 32, residual stages 64 and 128, 256 features, 0.32 M parameters) was
    chosen on the embedded 50-class data set: with the demo's recipe it reached 50 % test
    accuracy after 12 epochs where the same-size plain conv stack reached 41 %, at 10 % less
    compute per step; a higher-resolution stem or a third block did not help.
    """

    def __init__(
        self,
        name: str,
        *,
        stem_channels: int,
        stage_channels: tuple[int, ...],
        n_features: int,
        residual: bool,
        default_image_size_px: int = 64,
    ) -> None:
        super().__init__()
        self.name = name
        self.n_features = n_features
        self.default_image_size_px = default_image_size_px
        self.min_image_size_px = 2 ** (1 + len(stage_channels))
        layers: list[nn.Module] = [_conv_bn_relu(3, stem_channels, stride=2)]
        n_in = stem_channels
        for n_channels in stage_channels:
            if residual:
                layers.append(_ResidualBlock(n_in, n_channels))
            else:
                layers.append(_conv_bn_relu(n_in, n_channels, stride=2))
            n_in = n_channels
        layers.append(_conv_bn_relu(n_in, n_features, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, n_f, H/8, W/8) of normalised images (B, 3, H, W)."""
        return self.layers(images)


@register_backbone("small_cnn")
def _small_cnn(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("small_cnn", reduced_strides)
    return SmallCNN(
        "small_cnn", stem_channels=32, stage_channels=(64, 128), n_features=256, residual=True
    )


@register_backbone("tiny_cnn")
def _tiny_cnn(*, reduced_strides: bool = False) -> Backbone:
    _no_reduced_strides("tiny_cnn", reduced_strides)
    return SmallCNN(
        "tiny_cnn", stem_channels=8, stage_channels=(16, 16), n_features=32, residual=False
    )
