"""Encoder registry: MambaVision (the `mambavision` package) and any timm model.

`build_encoder(name, in_chans, pretrained)` returns an `Encoder`: an nn.Module whose
forward maps (B, in_chans, H, W) to four feature maps at strides 4, 8, 16, 32 (H and W
multiples of 32), described by `channels` and `reductions` (as timm's `feature_info`).

Names
- "mambavision_t", "mambavision_t2", "mambavision_s", "mambavision_b", "mambavision_l",
  "mambavision_l2", and the package's other variants ("mambavision_b_21k", ...): the
  package's `mamba_vision_<VARIANT>` model (its own defaults: depths, widths, drop-path
  rate). The four outputs are the stage outputs *before* each downsample, each through a
  new per-stage LayerNorm over channels (`stage_norms`, random init: they are not in the
  classification checkpoints). The classification `norm` and `head` are dropped.
  MambaVision is under NVIDIA's non-commercial source licence.
- anything else: a timm model, `features_only=True` with the `out_indices` whose
  reductions are 4, 8, 16, 32 (e.g. resnet18/resnet34: out_indices (1, 2, 3, 4)); a
  model without all four strides is refused with a ConfigError.

Single-channel SAR input (in_chans=1): the first conv is built with `in_chans` input
channels. Pretrained RGB weights are adapted with timm's `adapt_input_conv`: for 1
channel the RGB kernels are summed into one (what timm's `in_chans=1` does), so a grey
image x gives the response the RGB model gave to (x, x, x).

Pretrained weights (`pretrained`: "imagenet", a local path, file:// or s3:// URI; None = random init):
- "imagenet": the encoder's published ImageNet weights, through the Hugging Face hub cache
  (`huggingface_hub.hf_hub_download`: HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE honoured;
  fetched into the cache when online). timm models: their pretrained config's hub repo
  (e.g. timm/resnet34.a1_in1k, model.safetensors); MambaVision: NVIDIA's repos named in the
  package's configs (e.g. nvidia/MambaVision-B-1K, mambavision_base_1k.pth.tar). Then
  loaded like a local file. Offline without a cached copy: ConfigError saying which file
  to place where. An encoder without published weights: ConfigError.
- `.safetensors` files are read with safetensors; anything else with
  `torch.load(weights_only=True)` (no arbitrary unpickling). A dict with a "state_dict",
  "model" or "state_dict_ema" entry is unwrapped; a "module." prefix is stripped.
- MambaVision: the package's `.pth.tar` checkpoints ("state_dict" key) or this
  encoder's own state dict. `levels.<i>.downsample.*` is mapped to `downsamples.<i>.*`;
  `head.*` and the classifier `norm.*` are ignored; `stage_norms.*` may be absent.
- timm: the timm model's own checkpoint (e.g. a `model.safetensors` of the timm model;
  classifier weights are ignored), or this encoder's own state dict.
- A missing file raises ConfigError naming it; weights that do not fit (missing or
  unexpected keys, wrong shapes) raise ConfigError listing them.
"""

from __future__ import annotations

import re
import warnings
from typing import Sequence

import torch
import torch.nn as nn

from dakd.errors import ConfigError
from dakd.weights import read_state_dict

__all__ = ["Encoder", "MambaVisionEncoder", "TimmEncoder", "build_encoder", "mambavision_names",
           "REDUCTIONS"]

REDUCTIONS = (4, 8, 16, 32)
_MV_PREFIX = "mambavision_"


class Encoder(nn.Module):
    """Base: forward(x) -> [f4, f8, f16, f32]; `channels` and `reductions` describe them."""

    channels: tuple[int, int, int, int]
    reductions: tuple[int, int, int, int] = REDUCTIONS
    name: str


# --------------------------------------------------------------------------- weights


def _fit_error(uri: str, missing: Sequence[str], unexpected: Sequence[str], shapes: Sequence[str]) -> ConfigError:
    def few(keys):
        keys = list(keys)
        return ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {few(shapes)}")
    return ConfigError(f"model.pretrained: weights {uri} do not fit the encoder (another architecture?): "
                       + "; ".join(parts))


def _load_checked(module: nn.Module, sd: dict[str, torch.Tensor], uri: str, *, allow_missing=()) -> None:
    """load_state_dict that raises ConfigError naming missing/unexpected/mis-shaped keys.

    `allow_missing`: key prefixes that may be absent (they keep their initialisation).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
              if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise _fit_error(uri, missing, unexpected, shapes)
    module.load_state_dict(sd, strict=False)


def _adapt_first_conv(sd: dict[str, torch.Tensor], key: str, in_chans: int) -> None:
    """Adapt an RGB (or other) first-conv weight to `in_chans` input channels, in place."""
    w = sd.get(key)
    if w is None or w.dim() != 4 or w.shape[1] == in_chans:
        return
    from timm.models import adapt_input_conv

    sd[key] = adapt_input_conv(in_chans, w, base_chans=w.shape[1])


# --------------------------------------------------------------------------- MambaVision


def _mambavision_module():
    """Import mambavision's model module, providing the selective scan first."""
    from dakd.models.selective_scan import install_mamba_ssm_shim

    install_mamba_ssm_shim()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mambavision imports timm's deprecated paths
        import mambavision.models.mamba_vision as mv
    return mv


def mambavision_names() -> list[str]:
    """Encoder names of the installed mambavision package's variants ([] if not installed)."""
    try:
        mv = _mambavision_module()
    except ImportError:
        return []
    return sorted(_MV_PREFIX + n[len("mamba_vision_"):].lower() for n in dir(mv)
                  if n.startswith("mamba_vision_") and callable(getattr(mv, n)))


class MambaVisionEncoder(Encoder):
    """MambaVision stages as a 4-level feature pyramid (outputs before each downsample)."""

    _FIRST_CONV = "patch_embed.conv_down.0.weight"

    def __init__(self, name: str, in_chans: int, pretrained: str | None):
        super().__init__()
        mv = _mambavision_module()
        variant = name[len(_MV_PREFIX):]
        factory = {n[len("mamba_vision_"):].lower(): getattr(mv, n) for n in dir(mv) if n.startswith("mamba_vision_")}
        if variant not in factory:
            raise ConfigError(f"unknown encoder {name!r}; MambaVision names: {', '.join(mambavision_names())}")
        model = factory[variant](pretrained=False, in_chans=in_chans, num_classes=0)
        self.name = name
        self.patch_embed = model.patch_embed
        self.levels = model.levels
        self.downsamples = nn.ModuleList()
        for level in self.levels:  # run the downsample ourselves, after taking the stage output
            self.downsamples.append(level.downsample if level.downsample is not None else nn.Identity())
            level.downsample = None
        dims = [int(level.blocks[0].conv1.in_channels) if level.conv else int(level.blocks[0].norm1.normalized_shape[0])
                for level in self.levels]
        from timm.layers import LayerNorm2d

        self.stage_norms = nn.ModuleList(LayerNorm2d(d) for d in dims)
        self.channels = tuple(dims)
        self.reductions = REDUCTIONS
        if pretrained is not None:
            self.load_pretrained(pretrained, in_chans)

    def load_pretrained(self, uri: str, in_chans: int) -> None:
        sd = read_state_dict(uri)
        if sd and all(k.startswith("model.") for k in sd):  # Hugging Face transformers layout
            sd = {k[len("model."):]: v for k, v in sd.items()}
        mapped = {}
        for k, v in sd.items():
            m = re.match(r"levels\.(\d+)\.downsample\.(.*)", k)
            if m:
                k = f"downsamples.{m.group(1)}.{m.group(2)}"
            if k.startswith(("head.", "norm.")):  # classifier head and its final BatchNorm
                continue
            mapped[k] = v
        _adapt_first_conv(mapped, self._FIRST_CONV, in_chans)
        _load_checked(self, mapped, uri, allow_missing=("stage_norms.",))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        feats = []
        for level, down, norm in zip(self.levels, self.downsamples, self.stage_norms):
            x = level(x)
            feats.append(norm(x))
            x = down(x)
        return feats


# --------------------------------------------------------------------------- timm


def _timm_feature_indices(name: str) -> list[int]:
    """timm out_indices whose reductions are 4, 8, 16, 32 (the last index of each stride)."""
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception:  # some models cannot be built on the meta device
        probe = timm.create_model(name, pretrained=False, features_only=True)
    by_stride = {}
    for idx, red in zip(probe.feature_info.out_indices, probe.feature_info.reduction()):
        by_stride[int(red)] = idx
    if not all(r in by_stride for r in REDUCTIONS):
        raise ConfigError(f"timm encoder {name!r} has feature strides {sorted(by_stride)}; "
                          f"SAROSS-Net needs {list(REDUCTIONS)}")
    return [by_stride[r] for r in REDUCTIONS]


class TimmEncoder(Encoder):
    """Any timm model with features at strides 4..32 (`features_only=True`)."""

    def __init__(self, name: str, in_chans: int, pretrained: str | None):
        super().__init__()
        import timm

        self.name = name
        self.out_indices = tuple(_timm_feature_indices(name))
        self.in_chans = in_chans
        self.model = timm.create_model(name, pretrained=False, features_only=True, out_indices=self.out_indices,
                                       in_chans=in_chans)
        self.channels = tuple(int(c) for c in self.model.feature_info.channels())
        self.reductions = tuple(int(r) for r in self.model.feature_info.reduction())
        if self.reductions != REDUCTIONS:
            raise ConfigError(f"timm encoder {name!r}: selected reductions {self.reductions}, expected {REDUCTIONS}")
        if pretrained is not None:
            self.load_pretrained(pretrained)

    def load_pretrained(self, uri: str) -> None:
        import timm

        sd = read_state_dict(uri)
        own = self.state_dict()
        if set(sd) == set(own) or (sd and all(k.startswith("model.") for k in sd)):
            _load_checked(self, sd, uri)  # this encoder's own state dict (keys "model.*")
            return
        if set("model." + k for k in sd) == set(own):  # the bare features model's state dict
            _load_checked(self.model, sd, uri)
            return
        # A checkpoint of the timm classification model: check it against the full model
        # (classifier dropped, first conv adapted), then let timm map it into the features
        # model exactly as timm's own pretrained loading does.
        full = timm.create_model(self.name, pretrained=False, in_chans=self.in_chans)
        cfg = full.pretrained_cfg or {}
        classifiers = cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        sd = {k: v for k, v in sd.items() if not any(k.startswith(c + ".") for c in classifiers)}
        first = cfg.get("first_conv")
        for conv in ((first,) if isinstance(first, str) else tuple(first or ())):
            _adapt_first_conv(sd, conv + ".weight", self.in_chans)
        _load_checked(full, sd, uri, allow_missing=tuple(c + "." for c in classifiers))
        self.model = timm.create_model(self.name, pretrained=True, features_only=True, out_indices=self.out_indices,
                                       in_chans=self.in_chans, pretrained_cfg_overlay={"state_dict": sd})

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))


# --------------------------------------------------------------------------- published weights

IMAGENET = "imagenet"


def published_weights(name: str) -> tuple[str, list[str], str | None]:
    """(hub repo, candidate file names, revision) of an encoder's published ImageNet weights.
    ConfigError when the encoder has none."""
    key = name.strip()
    if key.lower().startswith(_MV_PREFIX):
        mv = _mambavision_module()
        variant = key.lower()[len(_MV_PREFIX):]
        cfgs = {k[len("mamba_vision_"):].lower(): v for k, v in getattr(mv, "default_cfgs", {}).items()}
        url = (cfgs.get(variant) or {}).get("url") or ""
        m = re.match(r"https://huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", url)
        if not m:
            raise ConfigError(f"model.pretrained={IMAGENET}: encoder {name!r} has no published weights on the "
                              "Hugging Face hub; give a weight file (model.pretrained=PATH) or null")
        return m.group(1), [m.group(3)], m.group(2)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(key)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(f"model.pretrained={IMAGENET}: timm encoder {name!r} has no published weights on the "
                          "Hugging Face hub; give a weight file (model.pretrained=PATH) or null")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return repo, files, revision or None


def imagenet_weights(name: str) -> str:
    """Local path of `name`'s published ImageNet weights in the Hugging Face hub cache
    (downloaded into it when online). ConfigError saying which file to place where when
    there is no cached copy and none can be fetched."""
    from huggingface_hub import constants, hf_hub_download

    repo, files, revision = published_weights(name)
    errors = []
    for filename in files:
        try:
            return hf_hub_download(repo, filename, revision=revision)
        except Exception as exc:  # not cached and offline / no network, or no such file in the repo
            errors.append(f"{filename}: {type(exc).__name__}")
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    folder = f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}"
    raise ConfigError(
        f"model.pretrained={IMAGENET}: the {name} weights ({repo}, {files[0]}) are not in the Hugging Face cache "
        f"{constants.HF_HUB_CACHE} and could not be fetched{offline} [{'; '.join(errors)}]. On a connected machine "
        f"run `huggingface-cli download {repo} {files[0]}` with the same HF_HOME and copy {folder} here (the file "
        f"lies in {folder}/snapshots/<revision>/{files[0]}, refs/{revision or 'main'} names the revision), "
        "or set model.pretrained to a local copy of the file")


# --------------------------------------------------------------------------- registry


def build_encoder(name: str, in_chans: int, pretrained: str | None) -> Encoder:
    """Build an encoder by name (see the module docstring). Unknown names raise ConfigError."""
    key = name.strip()
    if pretrained == IMAGENET:
        pretrained = imagenet_weights(key)
    if key.lower().startswith(_MV_PREFIX):
        return MambaVisionEncoder(key.lower(), in_chans=in_chans, pretrained=pretrained)
    import timm

    if not timm.is_model(key) or key.startswith("mamba_vision_"):
        mv = mambavision_names()
        raise ConfigError(f"unknown encoder {name!r}; valid names: "
                          + (", ".join(mv) + ", " if mv else "(mambavision not installed), ")
                          + "or any timm model name with features at strides 4, 8, 16, 32 "
                          "(e.g. resnet18, resnet34, convnext_tiny)")
    return TimmEncoder(key, in_chans=in_chans, pretrained=pretrained)
