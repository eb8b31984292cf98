"""Prune a model autoprune does not know, scored by a metric it does not know, through the API.

A small encoder-decoder segmentation net (skip connection by concatenation, per-pixel logits) is
trained on synthetic shapes, then ``autoprune.search`` finds per-unit sparsities that halve its
FLOPs, scoring every pruned model by mean IoU, the user's own metric. The best policy is exported,
and the exported program is loaded back with plain PyTorch (no autoprune) and scored again.

    python examples/segmentation.py --out /tmp/seg            # about two minutes on two cores
    python examples/segmentation.py --out /tmp/seg --tiny     # seconds: what the test runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import autoprune

CLASSES = 3  # background, square, disc


def shapes(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy RGB images with a square and a disc each, and their per-pixel labels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = 0.3 * torch.randn(n, 3, size, size, generator=g)
    labels = torch.zeros(n, size, size, dtype=torch.long)
    colours = torch.tensor([[1.0, -0.5, 0.2], [-0.6, 0.9, 0.7]])
    for i in range(n):
        c = torch.randint(6, size - 6, (4,), generator=g)
        r = int(torch.randint(3, 7, (1,), generator=g))
        square = ((yy - c[0]).abs() <= r) & ((xx - c[1]).abs() <= r)
        disc = (yy - c[2]) ** 2 + (xx - c[3]) ** 2 <= r * r
        for k, mask in ((1, square), (2, disc)):
            labels[i][mask] = k
            images[i][:, mask] += colours[k - 1][:, None]
    return images, labels


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegNet(nn.Module):
    """Encoder (two strides), decoder with a concatenated skip, per-pixel class logits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(block(3, width), block(width, width))
        self.enc2 = nn.Sequential(block(width, 2 * width, 2), block(2 * width, 2 * width))
        self.enc3 = nn.Sequential(block(2 * width, 4 * width, 2), block(4 * width, 4 * width))
        self.up3 = block(4 * width, 2 * width)
        self.dec2 = block(4 * width, 2 * width)
        self.up2 = block(2 * width, width)
        self.dec1 = block(2 * width, width)
        self.head = nn.Conv2d(width, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(self.up3(e3), scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(self.up2(d2), scale_factor=2.0), e1], 1))
        return self.head(d1)


@torch.no_grad()
def mean_iou(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean intersection over union of the classes, over all pixels: the score autoprune keeps high."""
    pred = torch.cat([model(images[i : i + 128]).argmax(1) for i in range(0, len(images), 128)])
    ious = []
    for k in range(CLASSES):
        inter = ((pred == k) & (labels == k)).sum().item()
        union = ((pred == k) | (labels == k)).sum().item()
        ious.append(inter / union if union else 1.0)
    return sum(ious) / CLASSES


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (32,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the study and the exported model")
    p.add_argument("--tiny", action="store_true", help="a narrow net, few steps and episodes (for tests)")
    p.add_argument("--episodes", type=int, default=None)
    args = p.parse_args(argv)
    width, steps, episodes, n = (8, 60, 3, 256) if args.tiny else (32, 600, 40, 2048)
    episodes = args.episodes or episodes
    torch.manual_seed(0)

    train_x, train_y = shapes(n, seed=1)
    val_x, val_y = shapes(n // 4, seed=2)
    test_x, test_y = shapes(n // 4, seed=3)
    model = train(SegNet(width), train_x, train_y, steps)
    dense_miou = mean_iou(model, test_x, test_y)

    args.out.mkdir(parents=True, exist_ok=True)
    result = autoprune.search(
        model, train_x[:1], budget="0.5flops",
        score=lambda m: mean_iou(m, val_x, val_y),  # any model -> float, higher is better
        calib=torch.utils.data.DataLoader(train_x, batch_size=64),  # batches of inputs
        test_score=lambda m: mean_iou(m, test_x, test_y),
        data_name="shapes-seed1", episodes=episodes, storage=f"sqlite:///{args.out}/study.db",
        study_name="segnet", progress=not args.tiny,
    )
    print(result)
    metrics = result.export(args.out / "pruned")

    # What a user does with the export, with plain PyTorch: no autoprune needed.
    program = torch.export.load(str(args.out / "pruned" / "model.pt2")).module()
    summary = {
        "dense_miou": dense_miou,
        "pruned_miou": mean_iou(program, test_x, test_y),
        "flops_ratio": metrics["ratios"]["flops"],
        "params_ratio": metrics["ratios"]["params"],
        "best_trial": result.best.number,
        "policy": result.best_policy.sparsity,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"dense mIoU {dense_miou:.3f}; pruned to FLOPs x{summary['flops_ratio']:.3f}, params "
          f"x{summary['params_ratio']:.3f}: mIoU {summary['pruned_miou']:.3f} (reloaded from model.pt2)")
    return summary


if __name__ == "__main__":
    main()
