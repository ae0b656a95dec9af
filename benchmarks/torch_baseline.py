"""The CPU target's reference: a PyTorch CIFAR ResNet-20's training step on the same machine.

    pip install torch==2.13.0   # CPU build; not a dependency of stabnet, use a separate venv
    python benchmarks/torch_baseline.py [--channels_last]

ResNet-20 of He et al. (2016): 3×3 convolutions of 16/32/64 channels, three basic blocks per
stage, option-A shortcuts (strided subsampling, zero channels), BatchNorm, global average pooling;
about the cost of ResNet-D depth 18 (issue 5). Batch 128 of random 32×32×3 images, SGD with
momentum 0.9 and weight decay 1e-4. Prints ms/step per round and the median images per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.extra, self.stride = c_out - c_in, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x
        if self.stride != 1 or self.extra:
            lo = self.extra // 2
            shortcut = F.pad(
                x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, lo, self.extra - lo)
            )
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    def __init__(self, n: int = 3, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, c_in = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(Block(c_in, width, 2 if stage and i == 0 else 1))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels_last", action="store_true", help="NHWC memory format")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ResNet20()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(5):  # warm-up (oneDNN primitive creation)
        step()
    ms = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        ms.append(1e3 * (time.perf_counter() - t) / args.steps)
    layout = "channels_last" if args.channels_last else "NCHW"
    rate = args.batch * 1e3 / statistics.median(ms)
    rounds = [round(m, 1) for m in ms]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {layout}: "
          f"ms/step per round {rounds}, median {rate:.0f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
