"""Training benchmarks, measured side by side in one run (issue 4, "Targets").

(a) A dense training step with the feature diversity loss vs the same step with plain
    cross-entropy: ResNet-50 (random init), 224 px, reduced strides (28x28 maps), batch 8.
    Target: overhead <= 10%.
(b) The QPM fine-tuning step (50 selected features, 5 per class, binary head) vs the dense step
    with the diversity loss. Target: no slower.
(c) Peak memory of the features pass (``keep_pooled=False``) at several data set sizes, each in
    a fresh subprocess. Target: independent of the number of images.

The steps are the library's own (``openqpm.training``'s loss module, SGD, GradScaler on CUDA).
The variants of (a) and (b) run interleaved (one step of each per round, the order rotating each
round), and the medians over the rounds are compared, so slow drifts of a shared machine hit all
variants alike.

Usage:
    python benchmarks/training.py                      # CPU, the issue's settings
    python benchmarks/training.py --device cuda --batch-size 16 --rounds 20
    python benchmarks/training.py --quick              # small settings, a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from openqpm.features import extract_features
from openqpm.losses import feature_diversity_loss
from openqpm.models import DenseHead, QPMModel, create_backbone
from openqpm.training import _LossModule

DIVERSITY_BETA = 0.196  # resnet50, as the reference code


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_assignment(n_classes: int, n_features: int, n_per_class: int, seed: int) -> np.ndarray:
    """(n_classes, n_features) binary, n_per_class ones per row, all rows distinct."""
    rng = np.random.default_rng(seed)
    rows: set[tuple[int, ...]] = set()
    while len(rows) < n_classes:
        rows.add(tuple(sorted(rng.choice(n_features, n_per_class, replace=False).tolist())))
    matrix = np.zeros((n_classes, n_features), dtype=np.int64)
    for class_index, columns in enumerate(sorted(rows)):
        matrix[class_index, list(columns)] = 1
    return matrix


def _make_step(
    model: QPMModel, *, diversity_beta: float, device: torch.device, amp: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimisation step exactly as ``train_model`` does it (minus logging)."""
    loss_module = _LossModule(model, diversity_beta=diversity_beta)
    head_ids = {id(p) for p in model.head.parameters()}
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]},
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) in head_ids]},
    ]
    optimizer = torch.optim.SGD(
        [g for g in groups if g["params"]], lr=1e-4, momentum=0.9, weight_decay=5e-4
    )
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss, _, _, _ = loss_module(images, labels)
        if not torch.isfinite(loss):
            raise RuntimeError("benchmark step: non-finite loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def benchmark_steps(args: argparse.Namespace) -> dict[str, Any]:
    """(a) and (b): interleaved timing of three training steps."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    n_classes = args.n_classes
    # Three models with the same architecture and the same initial weights, so that every
    # variant runs the same arithmetic on the same data (the weights drift apart a little).
    backbone = create_backbone(args.arch, reduced_strides=args.reduced_strides)
    initial_state = {k: v.clone() for k, v in backbone.state_dict().items()}

    def dense_model() -> QPMModel:
        fresh = create_backbone(args.arch, reduced_strides=args.reduced_strides)
        fresh.load_state_dict(initial_state)
        head = DenseHead(fresh.n_features, n_classes)
        return QPMModel(fresh, head, class_names=[str(c) for c in range(n_classes)]).to(device)

    n_f = backbone.n_features
    rng = np.random.default_rng(0)
    selected = np.sort(rng.choice(n_f, args.n_features, replace=False))
    qpm = dense_model().to_qpm(
        selected,
        rng.uniform(0.1, 1.0, args.n_features),
        rng.uniform(0.5, 2.0, args.n_features),
        _random_assignment(n_classes, args.n_features, args.n_per_class, seed=0),
        dropout=0.1,
    )
    steps = {
        "dense_ce": _make_step(
            dense_model().train(), diversity_beta=0.0, device=device, amp=args.amp
        ),
        "dense_ce_diversity": _make_step(
            dense_model().train(), diversity_beta=DIVERSITY_BETA, device=device, amp=args.amp
        ),
        "qpm_finetune": _make_step(
            qpm.train(), diversity_beta=DIVERSITY_BETA, device=device, amp=args.amp
        ),
    }
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    labels = torch.randint(0, n_classes, (args.batch_size,), generator=generator)
    images, labels = images.to(device), labels.to(device)
    with torch.no_grad():
        map_shape = tuple(backbone.to(device)(images[:1]).shape[1:])
    del backbone

    # The loss alone (forward + backward on maps of the step's shape): the part of (a)'s
    # overhead that is the loss itself, measurable even where whole steps are noisy.
    maps = torch.rand((args.batch_size, *map_shape), generator=generator).to(device)
    maps.requires_grad_(True)
    loss_weights = torch.randn(n_classes, map_shape[0], device=device, requires_grad=True)
    loss_logits = torch.randn(args.batch_size, n_classes, device=device)

    def loss_only(images: torch.Tensor, labels: torch.Tensor) -> None:
        del images, labels
        feature_diversity_loss(maps, loss_logits, loss_weights, beta=DIVERSITY_BETA).backward()

    steps["diversity_loss_only"] = loss_only

    names = list(steps)
    for name in names:  # warm-up (allocator, cuDNN autotuning, first-call overheads)
        for _ in range(args.warmup):
            steps[name](images, labels)
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            steps[name](images, labels)
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "arch": args.arch,
        "reduced_strides": args.reduced_strides,
        "image_size_px": args.image_size,
        "batch_size": args.batch_size,
        "maps": map_shape,
        "n_classes": n_classes,
        "rounds": args.rounds,
        "amp": args.amp and device.type == "cuda",
        "median_s": medians,
        "all_s": times,
        "median_cpu_s": cpu_medians,
        "all_cpu_s": cpu_times,
        "diversity_overhead": medians["dense_ce_diversity"] / medians["dense_ce"] - 1.0,
        "diversity_overhead_cpu": cpu_medians["dense_ce_diversity"] / cpu_medians["dense_ce"] - 1,
        "loss_only_share": medians["diversity_loss_only"] / medians["dense_ce"],
        "loss_only_share_cpu": cpu_medians["diversity_loss_only"] / cpu_medians["dense_ce"],
        "qpm_vs_dense": medians["qpm_finetune"] / medians["dense_ce_diversity"],
        "qpm_vs_dense_cpu": cpu_medians["qpm_finetune"] / cpu_medians["dense_ce_diversity"],
        # the same ratios per round (the variants of a round ran back to back), then the median
        "paired_diversity_overhead_cpu": _paired(cpu_times, "dense_ce_diversity", "dense_ce") - 1,
        "paired_qpm_vs_dense_cpu": _paired(cpu_times, "qpm_finetune", "dense_ce_diversity"),
    }


def _paired(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over rounds of the per-round ratio of two variants."""
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


class _RandomImages(Dataset):
    """N random images generated from their index: the data set itself holds nothing."""

    def __init__(self, n_images: int, image_size: int, n_classes: int) -> None:
        self.n_images = n_images
        self.image_size = image_size
        self.n_classes = n_classes

    def __len__(self) -> int:
        return self.n_images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(index)
        image = torch.randn(3, self.image_size, self.image_size, generator=generator)
        return image, index % self.n_classes


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing).

    ``ru_maxrss`` alone would not do: Linux carries it over ``exec``, so a child started by a
    big parent reports the parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory_child(args: argparse.Namespace) -> None:
    """Run one features pass and print its peak memory as JSON (fresh process per size)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = create_backbone(args.memory_arch)
    n_classes = 50
    model = QPMModel(
        backbone,
        DenseHead(backbone.n_features, n_classes),
        class_names=[str(c) for c in range(n_classes)],
    ).to(device)
    loader = DataLoader(
        _RandomImages(args.memory_child, args.memory_image_size, n_classes),
        batch_size=args.memory_batch_size,
    )
    # a first pass over one batch so that lazy allocations (threads, kernels) are not counted
    warmup = DataLoader(_RandomImages(args.memory_batch_size, args.memory_image_size, n_classes),
                        batch_size=args.memory_batch_size)  # fmt: skip
    extract_features(model, warmup, device=device, keep_pooled=False)
    peak_was_reset = _reset_peak_rss()
    rss_before_mib = _peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = extract_features(model, loader, device=device, keep_pooled=args.memory_keep_pooled)
    elapsed = time.perf_counter() - start
    rss_after_mib = _peak_rss_mib()
    print(
        json.dumps(
            {
                "n_images": int(result.feature_stats.count),
                "keep_pooled": args.memory_keep_pooled,
                "peak_rss_mib": rss_after_mib,
                "peak_rss_growth_mib": rss_after_mib - rss_before_mib,
                "peak_was_reset": peak_was_reset,
                "cuda_peak_allocated_mib": (
                    torch.cuda.max_memory_allocated(device) / 2**20
                    if device.type == "cuda"
                    else None
                ),
                "time_s": elapsed,
            }
        )
    )


def benchmark_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(c): one fresh subprocess per data set size (and keep_pooled setting)."""
    results = []
    for keep_pooled in (False, True):
        for n_images in args.memory_sizes:
            command = [
                sys.executable,
                __file__,
                "--memory-child",
                str(n_images),
                "--device",
                args.device,
                "--memory-arch",
                args.memory_arch,
                "--memory-image-size",
                str(args.memory_image_size),
                "--memory-batch-size",
                str(args.memory_batch_size),
                "--threads",
                str(args.threads),
            ]
            if keep_pooled:
                command.append("--memory-keep-pooled")
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
    return results


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--no-reduced-strides", dest="reduced_strides", action="store_false")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-classes", type=int, default=200)
    parser.add_argument("--n-features", type=int, default=50)
    parser.add_argument("--n-per-class", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="(CUDA) no AMP")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[64, 512, 4096])
    parser.add_argument("--memory-arch", default="small_cnn")
    parser.add_argument("--memory-image-size", type=int, default=64)
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny settings, a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-keep-pooled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.image_size, args.batch_size, args.n_classes = "resnet18", 64, 4, 20
        args.rounds, args.memory_sizes = 3, [64, 256]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        _memory_child(args)
        return 0
    report: dict[str, Any] = {}
    if not args.skip_steps:
        steps = benchmark_steps(args)
        report["steps"] = steps
        print(
            f"(a)/(b) training steps on {steps['device']} ({steps['torch_threads']} threads), "
            f"{steps['arch']} reduced_strides={steps['reduced_strides']}, "
            f"{steps['image_size_px']} px, batch {steps['batch_size']}, maps {steps['maps']}, "
            f"{steps['n_classes']} classes, AMP {steps['amp']}, median of {steps['rounds']} "
            "interleaved rounds:"
        )
        for name, seconds in steps["median_s"].items():
            spread = ", ".join(f"{t:.3f}" for t in steps["all_s"][name])
            print(
                f"  {name:<20} wall {seconds:8.3f} s  process CPU "
                f"{steps['median_cpu_s'][name]:8.3f} s   wall per round [{spread}]"
            )
        print(
            f"  (a) diversity loss overhead: {100 * steps['diversity_overhead']:+.1f}% wall, "
            f"{100 * steps['diversity_overhead_cpu']:+.1f}% CPU time; the loss alone "
            f"(forward + backward) = {100 * steps['loss_only_share']:.1f}% of a CE step wall, "
            f"{100 * steps['loss_only_share_cpu']:.1f}% CPU; median of per-round ratios "
            f"{100 * steps['paired_diversity_overhead_cpu']:+.1f}% CPU (target <= 10%)"
        )
        print(
            f"  (b) QPM fine-tuning step / dense step: {steps['qpm_vs_dense']:.3f} wall, "
            f"{steps['qpm_vs_dense_cpu']:.3f} CPU time, median of per-round ratios "
            f"{steps['paired_qpm_vs_dense_cpu']:.3f} CPU (target <= 1.0)"
        )
    if not args.skip_memory:
        memory = benchmark_memory(args)
        report["memory"] = memory
        print(
            f"(c) features pass peak memory, {args.memory_arch} at {args.memory_image_size} px, "
            f"batch {args.memory_batch_size}, fresh process per row:"
        )
        for row in memory:
            cuda = (
                f", CUDA peak {row['cuda_peak_allocated_mib']:.1f} MiB"
                if row["cuda_peak_allocated_mib"] is not None
                else ""
            )
            print(
                f"  keep_pooled={row['keep_pooled']!s:<5} {row['n_images']:6d} images: peak RSS "
                f"{row['peak_rss_mib']:7.1f} MiB (growth during the pass "
                f"{row['peak_rss_growth_mib']:+6.1f} MiB){cuda}, {row['time_s']:.1f} s"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
