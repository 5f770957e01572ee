"""Peak memory of ``openqpm.metrics.evaluate_model`` at two data set sizes, side by side.

The reference code keeps every test feature map of a dense model in RAM (about 37 GB on CUB at
28x28 maps). ``evaluate_model`` streams: its peak memory should not grow with the number of
images. Each size runs in a fresh subprocess (peak RSS is per process), on a dense model with
2048 features (like ResNet-50) over procedurally generated images, so the data set itself takes
no memory. Contrastiveness is skipped for more than 1000 features, as in the reference.

Usage:
    python benchmarks/metrics_memory.py                  # 500 and 4000 images
    python benchmarks/metrics_memory.py --sizes 1000 8000 --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

N_FEATURES = 2048
N_CLASSES = 50


def _child(n_images: int, *, image_size_px: int, batch_size: int, device: str) -> dict:
    """Run one evaluation in this process and report its memory (run in a subprocess)."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from openqpm.metrics import evaluate_model
    from openqpm.models import DenseHead, QPMModel
    from openqpm.models.backbones import Backbone

    torch.set_num_threads(1)
    torch.manual_seed(0)

    class WideBackbone(Backbone):
        """Three strided convs, then 2048 non-negative channels (8x8 maps at 64 px)."""

        def __init__(self) -> None:
            super().__init__()
            self.name = "wide_benchmark_cnn"
            self.n_features = N_FEATURES
            self.default_image_size_px = 64
            self.layers = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(64, N_FEATURES, 1),
                nn.ReLU(),
            )

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.layers(images)

    class GeneratedImages(Dataset):
        """Images made from their index on the fly: no memory that grows with the size."""

        def __init__(self, n: int, offset: int) -> None:
            self.n = n
            self.offset = offset

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            generator = torch.Generator().manual_seed(self.offset + index)
            image = torch.randn(3, image_size_px, image_size_px, generator=generator)
            return image, index % N_CLASSES

    model = QPMModel(
        WideBackbone(),
        DenseHead(N_FEATURES, N_CLASSES),
        class_names=[f"class {c}" for c in range(N_CLASSES)],
    ).eval()
    test_loader = DataLoader(GeneratedImages(n_images, 0), batch_size=batch_size)
    train_loader = DataLoader(GeneratedImages(n_images, 10**6), batch_size=batch_size)
    warm_up = DataLoader(GeneratedImages(batch_size, 2 * 10**6), batch_size=batch_size)
    evaluate_model(model, warm_up, warm_up, device=device)  # imports, allocator, first batch
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start_s = time.perf_counter()
    result = evaluate_model(model, test_loader, train_loader, device=device)
    elapsed_s = time.perf_counter() - start_s
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        map_side = model.forward_features(torch.zeros(1, 3, image_size_px, image_size_px)).shape[-1]
    return {
        "n_images": n_images,
        "peak_mb": peak_kb / 1024,
        "growth_mb": (peak_kb - baseline_kb) / 1024,
        "time_s": elapsed_s,
        "all_maps_mb": n_images * N_FEATURES * map_side * map_side * 4 / 2**20,
        "accuracy": result["accuracy"],
        "sid_at_5": result["sid_at_5"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 4000], metavar="N")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = {"image_size_px": args.image_size, "batch_size": args.batch_size}
    if args.child is not None:
        print(json.dumps(_child(args.child, device=args.device, **options)))
        return 0
    rows = []
    for n_images in args.sizes:
        command = [
            sys.executable,
            __file__,
            "--child",
            str(n_images),
            "--image-size",
            str(args.image_size),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(
        f"evaluate_model, dense model with {N_FEATURES} features, {args.image_size} px images, "
        f"batch {args.batch_size}, {args.device}; test and train sets of N images each"
    )
    header = f"{'N images':>9} {'peak RSS MB':>12} {'growth MB':>10} {'time s':>8} "
    header += f"{'all test maps MB':>17}"
    print(header)
    for row in rows:
        print(
            f"{row['n_images']:>9} {row['peak_mb']:>12.0f} {row['growth_mb']:>10.1f} "
            f"{row['time_s']:>8.1f} {row['all_maps_mb']:>17.0f}"
        )
    small, large = rows
    print(
        f"{large['n_images'] / small['n_images']:.0f}x the images: peak RSS x"
        f"{large['peak_mb'] / small['peak_mb']:.2f}; keeping every test map (the reference) "
        f"would need {large['all_maps_mb']:.0f} MB at N = {large['n_images']}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
