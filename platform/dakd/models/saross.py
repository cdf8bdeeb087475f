"""SAROSS-Net: encoder (MambaVision or any timm model) + UNet++ decoder with CAFT skips.

Any input size works: the input is zero-padded on the bottom and right to the next
multiple of 32 (the encoder's deepest stride), and the logits are cropped back to the
input's H x W. Zero padding = the value of a mid-grey pixel under the project's
normalisation (x = uint8 / 127.5 - 1), and it never mixes content across the border the
way reflection would. Example: OSD's 650 x 1250 test images run at 672 x 1280.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dakd.config import SarossModelConfig
from dakd.models.decoder import UNetPlusPlusDecoder
from dakd.models.encoders import build_encoder

__all__ = ["SAROSSNet", "PAD_MULTIPLE"]

PAD_MULTIPLE = 32


class SAROSSNet(nn.Module):
    """The segmentation student. forward (B, in_chans, H, W) -> logits (B, num_classes, H, W).

    Args (all required, keyword-only; defaults live in the config):
        encoder_name: a `dakd.models.encoders` name ("mambavision_b", "resnet34", any timm model).
        num_classes: number of classes.
        in_chans: input channels (1 for SAR).
        pretrained: path/URI of encoder weights, or None for random init.
        decoder_channels: UNet++ node channels at strides 4, 8, 16.
        skip_module: "caft" | "conv3x3" | "none".
        caft_heads: heads of each CAFT block.
    """

    def __init__(self, *, encoder_name: str, num_classes: int, in_chans: int, pretrained: str | None,
                 decoder_channels: Sequence[int], skip_module: str, caft_heads: int):
        super().__init__()
        self.encoder = build_encoder(encoder_name, in_chans=in_chans, pretrained=pretrained)
        self.decoder = UNetPlusPlusDecoder(encoder_channels=self.encoder.channels, decoder_channels=decoder_channels,
                                           num_classes=num_classes, skip_module=skip_module, caft_heads=caft_heads)
        self.num_classes = num_classes
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = (PAD_MULTIPLE - h % PAD_MULTIPLE) % PAD_MULTIPLE
        pw = (PAD_MULTIPLE - w % PAD_MULTIPLE) % PAD_MULTIPLE
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="constant", value=0.0)
        logits = self.decoder(self.encoder(x), out_size=x.shape[-2:])
        return logits[..., :h, :w]


IN_CHANS = 1  # SAR images are single-channel


def build_student(model: SarossModelConfig | dict, num_classes: int, in_chans: int = IN_CHANS,
                  pretrained: bool = True) -> SAROSSNet:
    """SAROSS-Net from its model config (or the `arch` dict of a checkpoint)."""
    m = model if isinstance(model, SarossModelConfig) else SarossModelConfig.model_validate(
        {k: v for k, v in model.items() if k in SarossModelConfig.model_fields})
    return SAROSSNet(encoder_name=m.encoder, num_classes=num_classes, in_chans=in_chans,
                     pretrained=m.pretrained if pretrained else None, decoder_channels=tuple(m.decoder_channels),
                     skip_module=m.skip_module, caft_heads=m.caft_heads)


def arch_dict(model: SarossModelConfig, num_classes: int, in_chans: int = IN_CHANS) -> dict:
    """The `arch` a student checkpoint records: the model config plus classes and input channels."""
    return {**model.model_dump(mode="json"), "num_classes": num_classes, "in_chans": in_chans}
