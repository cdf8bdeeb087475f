"""UNet++ decoder with CAFT blocks on the skip pathways (SAROSS-Net's decoder).

Nodes X[i][j] (Zhou et al. 2018): level i = 0..3 is the encoder stage at stride
4 * 2**i; X[i][0] is the encoder feature of stage i. For j >= 1 (i + j <= 3):

    T[i][0] = X[i][0]
    T[i][j] = skip(T[i][j-1], up(X[i+1][j-1]))          the transferred HR feature
    X[i][j] = Block(cat[T[i][j], X[i][1], ..., X[i][j-1], up(X[i+1][j-1])])

`up` is bilinear x2 resizing (to the exact size of level i). `skip` depends on
`skip_module` (the paper's ablation, supplementary Table "Effect of CAFT blocks"):
  - "caft":    T[i][j] = CAFT(Q = up(X[i+1][j-1]), K/V = T[i][j-1]): each CAFT block
               passes its HR output on to the next CAFT block of its level and to the
               decoder node X[i][j] (PAPER.md: "each CAFT passes HR detail on to the
               next CAFT block or decoder block, as selected by LR semantics").
  - "conv3x3": T[i][j] = ReLU(BN(Conv3x3(T[i][j-1]))), same chain without the query.
  - "none":    T[i][j] = X[i][0], the plain UNet++ dense skip.
Block = two (Conv3x3 -> BatchNorm -> ReLU). The head is a 1x1 conv on X[0][3] (stride 4)
followed by bilinear x4 upsampling of the logits to the input size.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dakd.config import SKIP_MODULES
from dakd.errors import ConfigError
from dakd.models.caft import CAFT

__all__ = ["UNetPlusPlusDecoder", "SKIP_MODULES"]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))


class _ConvSkip(nn.Module):
    """The "conv3x3" ablation: a 3x3 conv block on the skip; ignores the LR feature."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv_bn_relu(channels, channels)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return self.conv(hr)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UNetPlusPlusDecoder(nn.Module):
    """UNet++ over four encoder stages (strides 4, 8, 16, 32) with optional CAFT skips.

    Args:
        encoder_channels: channels of the four encoder stages, shallow to deep.
        decoder_channels: channels of the decoder nodes at levels 0, 1, 2 (strides 4,
            8, 16), shallow to deep.
        num_classes: output channels of the head.
        skip_module: "caft" | "conv3x3" | "none".
        caft_heads: attention heads of every CAFT block (must divide the channels of
            encoder stages 0..2, else ConfigError); ignored unless skip_module == "caft".
    forward(features: 4 maps at strides 4..32, out_size (H, W)) -> logits (B, C, H, W).
    """

    def __init__(self, *, encoder_channels: Sequence[int], decoder_channels: Sequence[int], num_classes: int,
                 skip_module: str, caft_heads: int):
        super().__init__()
        if len(encoder_channels) != 4:
            raise ValueError(f"UNet++ decoder needs 4 encoder stages, got channels {tuple(encoder_channels)}")
        if len(decoder_channels) != 3:
            raise ValueError(f"decoder_channels must have 3 entries (strides 4, 8, 16), got {tuple(decoder_channels)}")
        if skip_module not in SKIP_MODULES:
            raise ValueError(f"skip_module {skip_module!r} is not one of {SKIP_MODULES}")
        if skip_module == "caft" and (caft_heads < 1 or any(c % caft_heads for c in encoder_channels[:3])):
            raise ConfigError(f"caft_heads={caft_heads} must divide the channels {tuple(encoder_channels[:3])} "
                              f"of the encoder stages at strides 4, 8, 16")
        self.skip_module = skip_module
        enc = [int(c) for c in encoder_channels]
        dec = [int(c) for c in decoder_channels]

        def node_channels(i: int, j: int) -> int:
            return enc[i] if j == 0 else dec[i]

        self.blocks = nn.ModuleDict()
        self.skips = nn.ModuleDict()
        for j in range(1, 4):
            for i in range(0, 4 - j):
                cin = enc[i] + sum(dec[i] for _ in range(1, j)) + node_channels(i + 1, j - 1)
                self.blocks[f"x{i}_{j}"] = _Block(cin, dec[i])
                if skip_module == "caft":
                    self.skips[f"t{i}_{j}"] = CAFT(hr_channels=enc[i], lr_channels=node_channels(i + 1, j - 1),
                                                   heads=caft_heads)
                elif skip_module == "conv3x3":
                    self.skips[f"t{i}_{j}"] = _ConvSkip(enc[i])
        self.head = nn.Conv2d(dec[0], num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        if len(features) != 4:
            raise ValueError(f"expected 4 feature maps, got {len(features)}")
        x = {(i, 0): f for i, f in enumerate(features)}
        t = {(i, 0): f for i, f in enumerate(features[:3])}
        for j in range(1, 4):
            for i in range(0, 4 - j):
                lr = _up(x[(i + 1, j - 1)], x[(i, 0)])
                if self.skip_module == "none":
                    t[(i, j)] = x[(i, 0)]
                else:
                    t[(i, j)] = self.skips[f"t{i}_{j}"](lr, t[(i, j - 1)])
                parts = [t[(i, j)]] + [x[(i, k)] for k in range(1, j)] + [lr]
                x[(i, j)] = self.blocks[f"x{i}_{j}"](torch.cat(parts, dim=1))
        logits = self.head(x[(0, 3)])
        return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
