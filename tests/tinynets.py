"""Tiny networks for tests: a residual add and a concat, so coupled units are exercised."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                                   nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(w))
        self.branch_a = nn.Sequential(nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False),
                                      nn.BatchNorm2d(w), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(w, w // 2, 1, stride=2, bias=False),
                                      nn.BatchNorm2d(w // 2), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(w + w // 2, 2 * w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * w), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], 1)
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny(num_classes: int = 10, in_channels: int = 1) -> TinyNet:
    return TinyNet(num_classes, in_channels)


class MLP(nn.Module):
    """No BatchNorm, no convs: linear units only."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 32),
                                 nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> MLP:
    return MLP(num_classes, in_channels, image_size)
