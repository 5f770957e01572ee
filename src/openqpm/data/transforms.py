"""Image transforms as the paper's code applies them, data set statistics, and their estimation.

Training (fine-grained recipe of the reference code, spec §1.1 and §6): resize (a squash to a
square for box-cropped birds, otherwise shorter side + random crop with 4 px zero padding),
random horizontal flip, colour jitter 0.1 (brightness, contrast, saturation; no hue),
TrivialAugmentWide, tensor, normalisation with the data set's own mean/std. Test: the same resize
(centre crop instead of the random one), tensor, normalisation.

ImageNet recipe (``augment="imagenet"``; paper App. C.A, spec §1.8): random resized crop,
horizontal flip, colour jitter 0.1, tensor, PCA lighting noise (:class:`Lighting`),
normalisation; test: resize the shorter side to 256/224 of the output side, centre crop, tensor,
normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torchvision import transforms as T

from openqpm.data._base import IMAGENET_MEAN_STD, ImageDataset, MeanStd

_logger = logging.getLogger(__name__)

__all__ = [
    "AUGMENTATIONS",
    "DATASET_STATS",
    "IMAGENET_PCA_EIGENVALUES",
    "IMAGENET_PCA_EIGENVECTORS",
    "Lighting",
    "build_transforms",
    "compute_mean_std",
]

# Per-channel (mean, std) of each data set, as in the reference code's dataset parameters
# (spec §6). The synthetic set stores its own statistics in openqpm_synthetic.json.
DATASET_STATS: dict[str, MeanStd] = {
    "cub": ((0.4853, 0.4964, 0.4295), (0.2300, 0.2258, 0.2625)),
    "travelingbirds": ((0.4584, 0.4369, 0.3957), (0.2610, 0.2569, 0.2722)),
    "cars": ((0.4593, 0.4466, 0.4453), (0.2920, 0.2910, 0.2988)),
    "aircraft": ((0.4827, 0.5130, 0.5352), (0.2236, 0.2170, 0.2478)),
    "imagenet": IMAGENET_MEAN_STD,
}

_JITTER = 0.1  # brightness, contrast and saturation jitter of the reference code
_PADDING_PX = 4  # zero padding of the random crop
# ImageNet test transform: the shorter side is resized to 256 px for a 224 px centre crop
_RESIZE_RATIO = 256 / 224
# Standard deviation of the lighting noise of the reference code's ImageNet recipe (0.05; the
# original AlexNet-style recipes use 0.1).
_LIGHTING_STD = 0.05
# The principal components of ImageNet's RGB pixel values in [0, 1]: eigenvalues and the
# eigenvectors as columns (row i is channel i), the values every ImageNet lighting recipe uses.
IMAGENET_PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


# the names ``build_transforms(augment=...)`` accepts (``data.augment`` in a configuration)
AUGMENTATIONS = ("paper", "light", "imagenet")


class Lighting:
    """PCA lighting noise (AlexNet): shift every pixel by a random mix of the colour components.

    Draws ``alpha ~ N(0, alphastd)`` for each of the three principal components and adds the
    same RGB offset ``eigenvectors @ (alpha * eigenvalues)`` to every pixel. It acts on a
    ``(3, H, W)`` float tensor with values in [0, 1] (after ``ToTensor``, before ``Normalize``,
    as the reference code applies it; the components are those of [0, 1] pixel values). The
    draw uses torch's global random generator, which the data loader seeds per worker and epoch.

    Args:
        alphastd: standard deviation of the component weights; 0 returns the input unchanged.
        eigenvalues: (3,) variances of the principal components.
        eigenvectors: (3, 3), component ``j`` in column ``j``, channel ``i`` in row ``i``.

    Raises:
        ValueError: a negative ``alphastd`` or components of the wrong shape.

    Example:
        >>> Lighting(0.1)(torch.full((3, 2, 2), 0.5)).shape
        torch.Size([3, 2, 2])
    """

    def __init__(
        self,
        alphastd: float = _LIGHTING_STD,
        eigenvalues: Sequence[float] = IMAGENET_PCA_EIGENVALUES,
        eigenvectors: Sequence[Sequence[float]] = IMAGENET_PCA_EIGENVECTORS,
    ) -> None:
        if not float(alphastd) >= 0:
            raise ValueError(f"alphastd must be >= 0, got {alphastd}")
        self.alphastd = float(alphastd)
        self.eigenvalues = torch.tensor(eigenvalues, dtype=torch.float32)  # (3,)
        self.eigenvectors = torch.tensor(eigenvectors, dtype=torch.float32)  # (3, 3)
        if self.eigenvalues.shape != (3,) or self.eigenvectors.shape != (3, 3):
            raise ValueError(
                "Lighting needs 3 eigenvalues and 3x3 eigenvectors, got shapes "
                f"{tuple(self.eigenvalues.shape)} and {tuple(self.eigenvectors.shape)}"
            )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (3, H, W) plus one random RGB offset; a new tensor."""
        if self.alphastd == 0:
            return image
        alpha = torch.randn(3) * self.alphastd  # (3,) weights of the components
        offset = self.eigenvectors @ (alpha * self.eigenvalues)  # (3,) RGB shift
        return image + offset.to(image.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def build_transforms(
    *,
    train: bool,
    image_size_px: int,
    mean: Sequence[float],
    std: Sequence[float],
    squash: bool,
    augment: str = "paper",
) -> T.Compose:
    """The paper's train or test transform, from a PIL image to a normalised tensor.

    Args:
        train: the augmenting training transform; otherwise the deterministic test transform.
        image_size_px: side of the square output.
        mean: per-channel mean used for normalisation (the data set's own).
        std: per-channel standard deviation used for normalisation.
        squash: resize to a square ignoring the aspect ratio (box-cropped birds); otherwise
            resize the shorter side and crop the square (random crop with padding when training,
            centre crop when testing). Ignored by ``augment="imagenet"``.
        augment: the recipe: ``"paper"`` (flip, colour jitter 0.1, TrivialAugmentWide, as the
            reference code's fine-grained recipe), ``"light"`` (flip and colour jitter only: for
            data whose classes are defined by small colour cues, such as the embedded data set,
            which TrivialAugment's colour operations would erase), both with the same test
            transform; or ``"imagenet"`` (the reference code's ImageNet recipe: random resized
            crop, flip, colour jitter 0.1, :class:`Lighting`; test: shorter side resized to
            ``round(image_size_px * 256 / 224)``, centre crop).

    Returns:
        A transform producing float tensors of shape ``(3, image_size_px, image_size_px)``.

    Raises:
        ValueError: a non-positive size, or mean/std without 3 entries or with a zero std.

    Example:
        >>> transform = build_transforms(train=False, image_size_px=224,
        ...                              mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), squash=True)
    """
    if int(image_size_px) < 1:
        raise ValueError(f"image_size_px must be positive, got {image_size_px}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 channels each, got {list(mean)} and {list(std)}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
    if any(float(value) <= 0 for value in std):
        raise ValueError(f"std must be positive in every channel, got {list(std)}")
    size = int(image_size_px)
    normalise = T.Normalize([float(value) for value in mean], [float(value) for value in std])
    if augment == "imagenet":
        return _imagenet_transform(train=train, size=size, normalise=normalise)
    steps: list[object]
    if squash:
        steps = [T.Resize((size, size))]
    elif train:
        steps = [T.Resize(size), T.RandomCrop(size, padding=_PADDING_PX)]
    else:
        steps = [T.Resize(size), T.CenterCrop(size)]
    if train:
        steps += [
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=_JITTER, contrast=_JITTER, saturation=_JITTER),
        ]
        if augment == "paper":
            steps.append(T.TrivialAugmentWide())
    steps += [T.ToTensor(), normalise]
    return T.Compose(steps)


def _imagenet_transform(*, train: bool, size: int, normalise: T.Normalize) -> T.Compose:
    """The reference code's ImageNet recipe (spec §1.8), with the normalisation it left out."""
    if not train:
        resize = round(size * _RESIZE_RATIO)
        return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalise])
    return T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=_JITTER, contrast=_JITTER, saturation=_JITTER),
            T.ToTensor(),
            Lighting(_LIGHTING_STD),
            normalise,
        ]
    )


def compute_mean_std(dataset: ImageDataset, *, max_images: int | None = None) -> MeanStd:
    """Per-channel mean and standard deviation of a data set's images, in [0, 1] units.

    Every pixel of every image counts once (images as :meth:`ImageDataset.load_image` returns
    them, i.e. after the box crop, before any transform); the std is the population std over
    all those pixels.

    Args:
        dataset: the data set, usually its training split.
        max_images: use at most this many images, evenly spaced over the data set (for a quick
            estimate on a large set); None uses all of them.

    Returns:
        ``((mean_r, mean_g, mean_b), (std_r, std_g, std_b))``.

    Raises:
        ValueError: the data set is empty or ``max_images`` is below 1.
    """
    n_images = len(dataset)
    if n_images == 0:
        raise ValueError("cannot compute mean/std of an empty data set")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    if max_images is None or max_images >= n_images:
        indices = np.arange(n_images)
    else:
        indices = np.unique(np.linspace(0, n_images - 1, max_images).round().astype(np.int64))
    # Integer sums are exact, so the result does not depend on the order of the images.
    channel_sum = np.zeros(3, dtype=np.int64)
    channel_square_sum = np.zeros(3, dtype=np.int64)
    n_pixels = 0
    for index in indices:
        pixels = np.asarray(dataset.load_image(int(index)), dtype=np.int64).reshape(
            -1, 3
        )  # (H*W, 3)
        channel_sum += pixels.sum(axis=0)
        channel_square_sum += (pixels * pixels).sum(axis=0)
        n_pixels += pixels.shape[0]
    mean = channel_sum / (n_pixels * 255.0)
    variance = channel_square_sum / (n_pixels * 255.0**2) - mean**2
    std = np.sqrt(np.maximum(variance, 0.0))
    _logger.debug("mean/std over %d images (%d pixels): %s %s", len(indices), n_pixels, mean, std)
    return (
        (float(mean[0]), float(mean[1]), float(mean[2])),
        (float(std[0]), float(std[1]), float(std[2])),
    )
