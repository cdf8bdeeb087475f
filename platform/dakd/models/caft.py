"""CAFT: Context-Aware Feature Transfer (SAROSS-Net's skip-connection block).

Cross-attention in Restormer's *transposed* form (Zamir et al. 2022, "MDTA"): the
attention map is over channels, (C/heads x C/heads) per head, never over pixels, so no
tensor of size (H*W)^2 is ever formed; cost is O(C^2 * H * W / heads) time and
O(C^2 / heads) memory for the map.

    q     = DWConv3x3(Conv1x1(LN(up(F_LR))))        (B, C, H, W)  query: LR semantics
    k, v  = DWConv3x3(Conv1x1(LN(F_HR))).chunk(2)   (B, C, H, W)  key/value: HR detail
    per head h (c = C / heads channels, N = H*W pixels):
        q_h, k_h  L2-normalised along the pixel axis
        A_h       = softmax_k( (q_h @ k_h^T) * temperature_h )    (c x c)
        o_h       = A_h @ v_h                                      (c x N)
    F_out = F_HR + Conv1x1(concat_h o_h)            (B, C, H, W)

- `up` is bilinear resizing of F_LR to F_HR's spatial size (skipped when equal).
- LN is a per-pixel LayerNorm over channels with weight and bias (Restormer's
  "WithBias" LayerNorm: biased variance, eps 1e-5); pre-norm, one for each input.
- The residual adds onto F_HR: the block outputs the HR feature, re-weighted by what
  the LR semantics select, with F_HR's channel count.
- `temperature` is a learnable per-head scalar, initialised to 1 (as Restormer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CAFT", "ChannelLayerNorm"]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) map, with weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        var = (x - mu).pow(2).mean(dim=1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class CAFT(nn.Module):
    """Transposed (channel) cross-attention: Q from the LR feature, K and V from the HR feature.

    Args:
        hr_channels: channels C of the HR feature (also the output's channels).
        lr_channels: channels of the LR feature (projected to C by the query conv).
        heads: attention heads; must divide hr_channels.
        bias: bias in the 1x1 and depthwise convs (Restormer uses False).
    forward(lr (B, C_lr, h, w), hr (B, C, H, W)) -> (B, C, H, W)
    """

    def __init__(self, hr_channels: int, lr_channels: int, heads: int, bias: bool = False):
        super().__init__()
        if heads < 1 or hr_channels % heads != 0:
            raise ValueError(f"CAFT: heads={heads} must divide hr_channels={hr_channels}")
        c = hr_channels
        self.heads = heads
        self.norm_q = ChannelLayerNorm(lr_channels)
        self.norm_kv = ChannelLayerNorm(c)
        self.q = nn.Conv2d(lr_channels, c, kernel_size=1, bias=bias)
        self.q_dw = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c, bias=bias)
        self.kv = nn.Conv2d(c, 2 * c, kernel_size=1, bias=bias)
        self.kv_dw = nn.Conv2d(2 * c, 2 * c, kernel_size=3, padding=1, groups=2 * c, bias=bias)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.proj = nn.Conv2d(c, c, kernel_size=1, bias=bias)

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        b, c, h, w = hr.shape
        if lr.shape[-2:] != hr.shape[-2:]:
            lr = F.interpolate(lr, size=(h, w), mode="bilinear", align_corners=False)
        q = self.q_dw(self.q(self.norm_q(lr)))
        k, v = self.kv_dw(self.kv(self.norm_kv(hr))).chunk(2, dim=1)
        # (B, heads, c/heads, N): attention runs over the channel axis
        q = q.reshape(b, self.heads, c // self.heads, h * w)
        k = k.reshape(b, self.heads, c // self.heads, h * w)
        v = v.reshape(b, self.heads, c // self.heads, h * w)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, c/h, c/h)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).reshape(b, c, h, w)
        return hr + self.proj(out)
