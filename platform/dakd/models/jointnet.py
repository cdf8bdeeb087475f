"""SAR-JointNet: two pixel-space U-Nets (SAR-Net for the image, Label-Net for the class
signal) coupled through zero-initialised convolutions, as in JointNet (apple/ml-jointnet).

Both branches are built from diffusers' UNet2DModel blocks and predict the clean signal
(x0-prediction): SAR-Net -> x0_hat (B, 1, H, W), Label-Net -> class logits (B, C, H, W).

Coupling (JointNet's pattern, both directions, same timestep):
- ``joint_in``: each branch adds zero_conv(other branch's noisy input) to its own
  first-conv output (so the encoder sees it);
- ``joint_skips`` / ``joint_mid``: each branch sends zero_conv(each of its encoder skip
  tensors) and zero_conv(its mid-block output) to the other branch, which adds them to
  its own skips / mid output before its decoder uses them. What is sent is computed
  from the features *before* the other branch's contributions are added.
At initialisation every coupling conv is zero, so the coupled SAR-Net output equals the
uncoupled one exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block

from dakd.errors import ConfigError

ARCH_NAME = "sar-jointnet"
ARCH_VERSION = 1
NORM_EPS = 1e-5
COUPLING_PREFIX = "joint_"  # name prefix of every coupling (zero-init) module in a branch


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class UNetBranch(nn.Module):
    """One U-Net of the pair (UNet2DModel layout) with its JointNet coupling convs.

    in_channels: channels of this branch's input/output; other_channels: channels of the
    other branch's noisy input (fed to ``joint_in``).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        other_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        attention_levels: tuple[int, ...],
        norm_num_groups: int,
        attention_head_dim: int,
    ):
        super().__init__()
        chans = tuple(block_out_channels)
        levels = len(chans)
        temb_dim = chans[0] * 4
        self.time_proj = Timesteps(chans[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.conv_in = nn.Conv2d(in_channels, chans[0], kernel_size=3, padding=1)

        self.down_blocks = nn.ModuleList()
        out_ch = chans[0]
        for i in range(levels):
            in_ch, out_ch = out_ch, chans[i]
            self.down_blocks.append(get_down_block(
                "AttnDownBlock2D" if i in attention_levels else "DownBlock2D",
                num_layers=layers_per_block, in_channels=in_ch, out_channels=out_ch,
                temb_channels=temb_dim, add_downsample=i < levels - 1, resnet_eps=NORM_EPS,
                resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim, downsample_padding=1,
                downsample_type="conv",
            ))
        self.mid_block = UNetMidBlock2D(
            in_channels=chans[-1], temb_channels=temb_dim, resnet_eps=NORM_EPS,
            resnet_act_fn="silu", resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim, add_attention=True,
        )
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        out_ch = rev[0]
        for i in range(levels):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, levels - 1)]
            self.up_blocks.append(get_up_block(
                "AttnUpBlock2D" if (levels - 1 - i) in attention_levels else "UpBlock2D",
                num_layers=layers_per_block + 1, in_channels=in_ch, out_channels=out_ch,
                prev_output_channel=prev_ch, temb_channels=temb_dim, add_upsample=i < levels - 1,
                resnet_eps=NORM_EPS, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim, upsample_type="conv",
            ))
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, chans[0], eps=NORM_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], in_channels, kernel_size=3, padding=1)

        # coupling convs (zero-initialised): the other input -> our first conv output,
        # our skips / mid -> the other branch
        self.joint_in = zero_module(nn.Conv2d(other_channels, chans[0], kernel_size=3, padding=1))
        self.joint_skips = nn.ModuleList(
            zero_module(nn.Conv2d(c, c, kernel_size=1)) for c in self._skip_channels(chans, layers_per_block)
        )
        self.joint_mid = zero_module(nn.Conv2d(chans[-1], chans[-1], kernel_size=1))

    @staticmethod
    def _skip_channels(chans: tuple[int, ...], layers_per_block: int) -> list[int]:
        """Channels of each encoder skip tensor, in the order ``encode`` returns them."""
        out = [chans[0]]  # conv_in output
        for i, c in enumerate(chans):
            out += [c] * layers_per_block + ([c] if i < len(chans) - 1 else [])
        return out

    def time_embed(self, t: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """t: int, () or (B,) timesteps -> (B, 4·ch0) embedding."""
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch)
        return self.time_embedding(self.time_proj(t).to(dtype))

    def encode(self, x: torch.Tensor, temb: torch.Tensor, other: torch.Tensor | None = None):
        """x: (B, Cin, H, W), other: the other branch's noisy input or None (uncoupled)
        -> (h (B, ch[-1], H/2^(L-1), W/2^(L-1)), skips: list of (B, c, h, w))."""
        h = self.conv_in(x)
        if other is not None:
            h = h + self.joint_in(other)
        skips = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=temb)
            skips += list(res)
        return h, skips

    def mid(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.mid_block(h, temb)

    def send(self, h: torch.Tensor, skips: list[torch.Tensor]):
        """What this branch contributes to the other: (zero_conv(mid), [zero_conv(skip)])."""
        return self.joint_mid(h), [conv(s) for conv, s in zip(self.joint_skips, skips)]

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        """(mid output, skips from ``encode``) -> (B, Cin, H, W)."""
        skips = list(skips)
        for block in self.up_blocks:
            n = len(block.resnets)
            res, skips = tuple(skips[-n:]), skips[:-n]
            h = block(hidden_states=h, res_hidden_states_tuple=res, temb=temb)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Uncoupled U-Net: (B, Cin, H, W), t -> (B, Cin, H, W)."""
        temb = self.time_embed(t, x.shape[0], x.dtype)
        h, skips = self.encode(x, temb)
        return self.decode(self.mid(h, temb), skips, temb)


class JointNet(nn.Module):
    """SAR-Net (``self.sar``, 1 channel) + Label-Net (``self.label``, C channels), coupled.

    Arguments (all required, the platform config supplies them):
        in_channels_image: image channels (1 for SAR).
        num_classes: C, channels of the label signal / logits.
        block_out_channels: channels per resolution level, e.g. (128, 128, 256, 256, 512, 512).
        layers_per_block: ResNet blocks per level in the encoder (decoder has one more).
        attention_levels: level indices (0 = full resolution) whose blocks use
            self-attention; the mid block always has attention.
        norm_num_groups: GroupNorm groups (must divide every entry of block_out_channels).
        attention_head_dim: channels per attention head.
        sample_size: training crop size (square), recorded for provenance and checks.
    """

    def __init__(
        self,
        *,
        in_channels_image: int,
        num_classes: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        attention_levels: tuple[int, ...],
        norm_num_groups: int,
        attention_head_dim: int,
        sample_size: int,
    ):
        super().__init__()
        chans = tuple(int(c) for c in block_out_channels)
        if not chans:
            raise ConfigError("block_out_channels: must name at least one level")
        bad = [c for c in chans if c % norm_num_groups or c % attention_head_dim]
        if bad:
            raise ConfigError(f"block_out_channels {chans}: every entry must be divisible by "
                              f"norm_num_groups={norm_num_groups} and attention_head_dim={attention_head_dim}")
        levels = tuple(sorted(int(i) for i in attention_levels))
        if any(i < 0 or i >= len(chans) for i in levels):
            raise ConfigError(f"attention_levels {levels}: must be level indices in [0, {len(chans) - 1}]")
        if num_classes < 2:
            raise ConfigError(f"num_classes: expected >= 2, got {num_classes}")
        self._arch = {
            "name": ARCH_NAME, "version": ARCH_VERSION,
            "in_channels_image": int(in_channels_image), "num_classes": int(num_classes),
            "block_out_channels": list(chans), "layers_per_block": int(layers_per_block),
            "attention_levels": list(levels), "norm_num_groups": int(norm_num_groups),
            "attention_head_dim": int(attention_head_dim), "sample_size": int(sample_size),
        }
        common = dict(block_out_channels=chans, layers_per_block=layers_per_block, attention_levels=levels,
                      norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim)
        self.sar = UNetBranch(in_channels=in_channels_image, other_channels=num_classes, **common)
        self.label = UNetBranch(in_channels=num_classes, other_channels=in_channels_image, **common)
        self.num_classes = int(num_classes)
        self.downsample_factor = 2 ** (len(chans) - 1)

    # ---- architecture record -------------------------------------------------------
    def arch_dict(self) -> dict:
        """JSON-serialisable architecture: name, version and the constructor arguments."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._arch.items()}

    @classmethod
    def from_arch(cls, arch: dict) -> "JointNet":
        """Build from an ``arch_dict()`` (e.g. read from a checkpoint's JSON)."""
        if arch.get("name") != ARCH_NAME or arch.get("version") != ARCH_VERSION:
            raise ConfigError(f"architecture: expected {ARCH_NAME} v{ARCH_VERSION}, "
                              f"found {arch.get('name')} v{arch.get('version')}")
        kwargs = {k: v for k, v in arch.items() if k not in ("name", "version")}
        for k in ("block_out_channels", "attention_levels"):
            kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)

    # ---- forward -----------------------------------------------------------------
    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.downsample_factor or w % self.downsample_factor:
            raise ValueError(f"input {h}x{w}: height and width must be multiples of {self.downsample_factor}")

    def forward(self, x_t: torch.Tensor, y_t: torch.Tensor | None, t: torch.Tensor):
        """x_t (B, 1, H, W), y_t (B, C, H, W) or None, t int or (B,) long
        -> (x0_hat (B, 1, H, W), logits (B, C, H, W)); with y_t None SAR-Net runs alone
        (stage 1, no coupling) and logits is None. Losses and samplers call this method,
        so a DDP-wrapped model works unchanged."""
        self._check_size(x_t)
        if y_t is None:
            return self.sar(x_t, t), None
        b = x_t.shape[0]
        temb_x = self.sar.time_embed(t, b, x_t.dtype)
        temb_y = self.label.time_embed(t, b, y_t.dtype)
        hx, skips_x = self.sar.encode(x_t, temb_x, other=y_t)
        hy, skips_y = self.label.encode(y_t, temb_y, other=x_t)
        hx, hy = self.sar.mid(hx, temb_x), self.label.mid(hy, temb_y)
        mid_to_y, skips_to_y = self.sar.send(hx, skips_x)
        mid_to_x, skips_to_x = self.label.send(hy, skips_y)
        x0_hat = self.sar.decode(hx + mid_to_x, [s + r for s, r in zip(skips_x, skips_to_x)], temb_x)
        logits = self.label.decode(hy + mid_to_y, [s + r for s, r in zip(skips_y, skips_to_y)], temb_y)
        return x0_hat, logits

    def sar_forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """SAR-Net alone (stage 1): (B, 1, H, W), t -> x0_hat (B, 1, H, W)."""
        return self.forward(x_t, None, t)[0]

    # ---- stage 2 initialisation and parameter groups ----------------------------------
    @staticmethod
    def _is_io(name: str) -> bool:
        return name.startswith(("conv_in.", "conv_out."))

    @staticmethod
    def _is_coupling(name: str) -> bool:
        return name.startswith(COUPLING_PREFIX)

    @torch.no_grad()
    def init_label_net_from_sar(self) -> list[str]:
        """Copy SAR-Net's weights into Label-Net, except Label-Net's input/output convs
        (new, C channels) and the coupling convs (left as they are). Returns the copied
        parameter/buffer names."""
        src = self.sar.state_dict()
        dst = self.label.state_dict()
        copied = []
        for name, value in src.items():
            if self._is_io(name) or self._is_coupling(name):
                continue
            dst[name].copy_(value)
            copied.append(name)
        return copied

    def _branch_params(self, branch: UNetBranch, coupling: bool):
        return [p for n, p in branch.named_parameters() if self._is_coupling(n) == coupling]

    def sar_parameters(self) -> list[nn.Parameter]:
        """SAR-Net's own parameters (no coupling convs)."""
        return self._branch_params(self.sar, coupling=False)

    def label_parameters(self) -> list[nn.Parameter]:
        """Label-Net's own parameters (no coupling convs)."""
        return self._branch_params(self.label, coupling=False)

    def interaction_parameters(self) -> list[nn.Parameter]:
        """Every coupling (zero-init) conv, both directions."""
        return self._branch_params(self.sar, coupling=True) + self._branch_params(self.label, coupling=True)


def check_arch(expected: dict, found: dict) -> None:
    """Raise ConfigError naming every field where `found` (e.g. a checkpoint's
    architecture) differs from `expected` (e.g. the config's)."""
    keys = sorted(set(expected) | set(found))
    diffs = [f"{k}: expected {expected.get(k)!r}, found {found.get(k)!r}"
             for k in keys if _norm(expected.get(k)) != _norm(found.get(k))]
    if diffs:
        raise ConfigError("JointNet architecture mismatch: " + "; ".join(diffs))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
