"""SAROSS-Net's parts: the selective scan, CAFT, encoders (weights), UNet++ decoder, mosaic.

Tiny and CPU-only: 64x64 inputs (and an odd 65x125 one), random init, no downloads.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dakd.errors import ConfigError, DataError
from dakd.models.caft import CAFT
from dakd.models.encoders import build_encoder, mambavision_names
from dakd.models.saross import SAROSSNet
from dakd.models.selective_scan import install_mamba_ssm_shim, selective_scan_fn, selective_scan_ref


# --------------------------------------------------------------------------- selective scan


def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """The S6 recurrence written out step by step, in float64, one state vector at a time."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    dt = delta + delta_bias.double()[None, :, None] if delta_bias is not None else delta
    if softplus:
        dt = torch.log1p(torch.exp(dt))
    b, d, L = u.shape
    out = torch.zeros(b, d, L, dtype=torch.float64)
    last = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    for bi in range(b):
        for di in range(d):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(L):
                b_t = B[bi, :, t] if B.dim() == 3 else B[di]
                c_t = C[bi, :, t] if C.dim() == 3 else C[di]
                h = torch.exp(dt[bi, di, t] * A[di]) * h + dt[bi, di, t] * b_t * u[bi, di, t]
                y = (c_t * h).sum()
                if D is not None:
                    y = y + D[di].double() * u[bi, di, t]
                if z is not None:
                    zz = z[bi, di, t].double()
                    y = y * zz / (1 + torch.exp(-zz))
                out[bi, di, t] = y
            last[bi, di] = h
    return out, last


@pytest.mark.parametrize("variable_bc", [True, False])
@pytest.mark.parametrize("with_extras", [True, False])
def test_reference_scan_equals_naive_recurrence(variable_bc, with_extras):
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 3, 4, 7
    u = torch.randn(b, d, L, generator=g)
    delta = torch.randn(b, d, L, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g) * 2
    B = torch.randn(b, n, L, generator=g) if variable_bc else torch.randn(d, n, generator=g)
    C = torch.randn(b, n, L, generator=g) if variable_bc else torch.randn(d, n, generator=g)
    D = torch.randn(d, generator=g) if with_extras else None
    z = torch.randn(b, d, L, generator=g) if with_extras else None
    bias = torch.randn(d, generator=g) if with_extras else None
    softplus = with_extras
    if not softplus:
        delta = delta.abs()  # a positive step without softplus
    out, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=softplus,
                                   return_last_state=True)
    want_out, want_last = naive_scan(u, delta, A, B, C, D, z, bias, softplus)
    assert out.shape == (b, d, L) and out.dtype == u.dtype
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), want_last, rtol=1e-5, atol=1e-5)
    # on the CPU the dispatcher is the reference scan
    torch.testing.assert_close(selective_scan_fn(u, delta, A, B, C, D, z, bias, softplus), out)


def test_reference_scan_is_differentiable():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 2, 5, generator=g, requires_grad=True)
    delta = torch.randn(1, 2, 5, generator=g, requires_grad=True)
    A = (-torch.rand(2, 3, generator=g)).requires_grad_()
    B = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    C = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    selective_scan_fn(u, delta, A, B, C, delta_softplus=True).square().sum().backward()
    for t in (u, delta, A, B, C):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_mamba_ssm_shim_provides_the_scan():
    install_mamba_ssm_shim()
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as imported

    try:
        import selective_scan_cuda  # noqa: F401  (a real mamba-ssm install)
    except ImportError:
        assert imported is selective_scan_fn


# --------------------------------------------------------------------------- CAFT


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by every aten op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _pixel_pair_tensors(shapes, n_pixels):
    """Shapes holding an (H*W) x (H*W) block, or with (H*W)^2 elements or more."""
    return [s for s in shapes if sum(1 for d in s if d >= n_pixels) >= 2 or math.prod(s) >= n_pixels ** 2]


def test_caft_output_shape_and_lr_upsampling():
    caft = CAFT(hr_channels=16, lr_channels=24, heads=4)
    hr = torch.randn(2, 16, 12, 10)
    lr = torch.randn(2, 24, 6, 5)
    assert caft(lr, hr).shape == hr.shape
    up = F.interpolate(lr, size=(12, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(caft(lr, hr), caft(up, hr))


def test_caft_never_builds_a_pixel_by_pixel_tensor():
    h = w = 32
    n = h * w
    caft = CAFT(hr_channels=16, lr_channels=32, heads=2)
    hr = torch.randn(2, 16, h, w, requires_grad=True)
    lr = torch.randn(2, 32, h // 2, w // 2, requires_grad=True)
    rec = ShapeRecorder()
    with rec:
        caft(lr, hr).sum().backward()
    assert len(rec.shapes) > 20  # the recorder saw the ops, forward and backward
    assert (2, 2, 8, 8) in rec.shapes  # the (C/heads x C/heads) channel attention map
    assert _pixel_pair_tensors(rec.shapes, n) == []
    # the probe does catch ordinary (spatial) attention on the same inputs
    rec2 = ShapeRecorder()
    with rec2:
        q = hr.flatten(2).transpose(1, 2)
        (q @ q.transpose(1, 2)).softmax(-1)
    assert _pixel_pair_tensors(rec2.shapes, n)


def einsum_caft(caft: CAFT, lr, hr):
    """CAFT written independently: explicit LayerNorm, convs, einsum channel attention."""
    b, c, h, w = hr.shape
    heads = caft.heads

    def layer_norm(x, ln):
        mu = x.mean(dim=1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)

    lr = F.interpolate(lr, size=(h, w), mode="bilinear", align_corners=False)
    q = F.conv2d(F.conv2d(layer_norm(lr, caft.norm_q), caft.q.weight), caft.q_dw.weight, padding=1, groups=c)
    kv = F.conv2d(F.conv2d(layer_norm(hr, caft.norm_kv), caft.kv.weight), caft.kv_dw.weight, padding=1, groups=2 * c)
    k, v = kv[:, :c], kv[:, c:]
    out = torch.empty(b, c, h * w)
    ch = c // heads
    for i in range(heads):
        sl = slice(i * ch, (i + 1) * ch)
        qh = q[:, sl].reshape(b, ch, h * w)
        kh = k[:, sl].reshape(b, ch, h * w)
        vh = v[:, sl].reshape(b, ch, h * w)
        qh = qh / qh.norm(dim=-1, keepdim=True)
        kh = kh / kh.norm(dim=-1, keepdim=True)
        logits = torch.einsum("bin,bjn->bij", qh, kh) * caft.temperature[i, 0, 0]
        attn = torch.exp(logits - logits.amax(-1, keepdim=True))
        attn = attn / attn.sum(-1, keepdim=True)
        out[:, sl] = torch.einsum("bij,bjn->bin", attn, vh)
    return hr + F.conv2d(out.reshape(b, c, h, w), caft.proj.weight)


def test_caft_equals_einsum_formulation():
    torch.manual_seed(0)
    caft = CAFT(hr_channels=12, lr_channels=20, heads=3)
    with torch.no_grad():  # move off the trivial initial values
        caft.temperature.copy_(torch.rand(3, 1, 1) * 3 + 0.2)
        for ln in (caft.norm_q, caft.norm_kv):
            ln.weight.add_(torch.randn_like(ln.weight) * 0.3)
            ln.bias.add_(torch.randn_like(ln.bias) * 0.3)
    hr = torch.randn(2, 12, 9, 11)
    lr = torch.randn(2, 20, 5, 6)
    torch.testing.assert_close(caft(lr, hr), einsum_caft(caft, lr, hr), rtol=1e-4, atol=1e-5)


def test_caft_gradients_reach_query_and_key_value_paths():
    torch.manual_seed(0)
    caft = CAFT(hr_channels=8, lr_channels=16, heads=2)
    hr = torch.randn(2, 8, 8, 8, requires_grad=True)
    lr = torch.randn(2, 16, 4, 4, requires_grad=True)
    caft(lr, hr).square().sum().backward()
    assert lr.grad.abs().sum() > 0 and hr.grad.abs().sum() > 0
    for p in (caft.q.weight, caft.q_dw.weight, caft.kv.weight, caft.kv_dw.weight, caft.temperature, caft.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_caft_rejects_heads_not_dividing_channels():
    with pytest.raises(ValueError, match="heads"):
        CAFT(hr_channels=10, lr_channels=8, heads=3)


# --------------------------------------------------------------------------- SAROSS-Net


def _net(encoder, skip, num_classes=3):
    return SAROSSNet(encoder_name=encoder, num_classes=num_classes, in_chans=1, pretrained=None,
                     decoder_channels=(16, 24, 32), skip_module=skip, caft_heads=4)


@pytest.mark.parametrize("encoder", ["mambavision_t", "resnet18"])
@pytest.mark.parametrize("size", [(64, 64), (65, 125)])
def test_saross_output_matches_input_size(encoder, size):
    torch.manual_seed(0)
    net = _net(encoder, "caft", num_classes=5)
    x = torch.randn(2, 1, *size)
    y = net(x)
    assert y.shape == (2, 5, *size)
    y.mean().backward()
    assert all(p.grad is not None for p in net.decoder.parameters())


@pytest.mark.parametrize("encoder", ["mambavision_t", "resnet18"])
def test_saross_pads_with_zeros_and_crops(encoder):
    torch.manual_seed(0)
    net = _net(encoder, "caft").eval()
    x = torch.randn(1, 1, 65, 125)
    padded = F.pad(x, (0, 128 - 125, 0, 96 - 65))
    with torch.no_grad():
        y = net(x)
        y_full = net.decoder(net.encoder(padded), out_size=(96, 128))
    torch.testing.assert_close(y, y_full[..., :65, :125])


@pytest.mark.parametrize("skip,n_caft", [("caft", 6), ("conv3x3", 0), ("none", 0)])
def test_skip_module_variants(skip, n_caft):
    torch.manual_seed(0)
    net = _net("resnet18", skip)
    assert sum(isinstance(m, CAFT) for m in net.modules()) == n_caft
    assert len(net.decoder.skips) == (0 if skip == "none" else 6)
    assert net(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_skip_variants_differ_only_in_the_skips():
    counts = {s: sum(p.numel() for p in _net("resnet18", s).decoder.parameters()) for s in ("caft", "conv3x3", "none")}
    assert counts["none"] < counts["caft"] and counts["none"] < counts["conv3x3"]
    with pytest.raises(ValueError, match="skip_module"):
        _net("resnet18", "attention")
    with pytest.raises(ConfigError, match="caft_heads=3"):
        SAROSSNet(encoder_name="resnet18", num_classes=2, in_chans=1, pretrained=None,
                  decoder_channels=(16, 24, 32), skip_module="caft", caft_heads=3)


def test_encoders_describe_their_pyramid():
    x = torch.randn(1, 1, 64, 64)
    for name in ("mambavision_t", "resnet18"):
        enc = build_encoder(name, in_chans=1, pretrained=None)
        feats = enc(x)
        assert enc.reductions == (4, 8, 16, 32)
        assert [f.shape[1] for f in feats] == list(enc.channels)
        assert [f.shape[-1] for f in feats] == [64 // r for r in enc.reductions]


# --------------------------------------------------------------------------- encoder weights


def _randomise(module):
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_timm_encoder_roundtrip_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    enc = build_encoder("resnet18", in_chans=1, pretrained=None)
    _randomise(enc)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    loaded = build_encoder("resnet18", in_chans=1, pretrained=str(path))
    _assert_same_weights(enc, loaded)


def test_timm_classification_checkpoint_is_adapted_to_one_channel(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False, in_chans=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    enc = build_encoder("resnet18", in_chans=1, pretrained=str(path))
    sd = enc.state_dict()
    torch.testing.assert_close(sd["model.conv1.weight"], full.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(sd["model.layer3.0.conv1.weight"], full.layer3[0].conv1.weight)
    # a grey image x gives the RGB model's response to (x, x, x)
    x = torch.randn(1, 1, 32, 32)
    enc.eval(), full.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[-1], full.forward_features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)


def test_mambavision_roundtrip_pth_tar(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("mambavision_t", in_chans=1, pretrained=None)
    _randomise(enc)
    path = tmp_path / "enc.pth.tar"
    torch.save({"state_dict": enc.state_dict()}, path)
    loaded = build_encoder("mambavision_t", in_chans=1, pretrained=str(path))
    _assert_same_weights(enc, loaded)


def test_mambavision_package_checkpoint_maps_into_encoder(tmp_path):
    from dakd.models.encoders import _mambavision_module

    torch.manual_seed(0)
    full = _mambavision_module().mamba_vision_T(pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "mambavision_tiny_1k.pth.tar"
    torch.save({"state_dict": full.state_dict(), "epoch": 300}, path)
    enc = build_encoder("mambavision_t", in_chans=1, pretrained=str(path))
    sd = enc.state_dict()
    torch.testing.assert_close(sd["patch_embed.conv_down.0.weight"],
                               full.patch_embed.conv_down[0].weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(sd["downsamples.1.reduction.0.weight"], full.levels[1].downsample.reduction[0].weight)
    torch.testing.assert_close(sd["levels.2.blocks.1.mixer.in_proj.weight"], full.levels[2].blocks[1].mixer.in_proj.weight)
    torch.testing.assert_close(sd["levels.3.blocks.3.mixer.qkv.weight"], full.levels[3].blocks[3].mixer.qkv.weight)


def test_weights_that_do_not_fit_are_named(tmp_path):
    from safetensors.torch import save_file

    enc = build_encoder("resnet18", in_chans=1, pretrained=None)
    sd = {k: v.contiguous() for k, v in enc.state_dict().items()}
    del sd["model.layer4.1.conv2.weight"]
    sd["model.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ConfigError) as err:
        build_encoder("resnet18", in_chans=1, pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg and "layer4.1.conv2.weight" in msg and "extra.weight" in msg


def test_pickled_objects_are_refused(tmp_path):
    enc = build_encoder("resnet18", in_chans=1, pretrained=None)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": enc.state_dict(), "payload": DataError("x", "y")}, path)
    with pytest.raises(ConfigError, match="weights-only"):
        build_encoder("resnet18", in_chans=1, pretrained=str(path))


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope" / "mambavision_base_1k.pth.tar"
    for name in ("mambavision_t", "resnet18"):
        with pytest.raises(ConfigError, match=str(missing)):
            build_encoder(name, in_chans=1, pretrained=str(missing))


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_encoder("no_such_net", in_chans=1, pretrained=None)
    msg = str(err.value)
    assert "no_such_net" in msg and "timm" in msg
    for name in mambavision_names():
        assert name in msg
    assert "mambavision_t" in mambavision_names() and "mambavision_b" in mambavision_names()
    with pytest.raises(ConfigError, match="mambavision_b"):
        build_encoder("mambavision_xl", in_chans=1, pretrained=None)


def test_timm_model_without_the_four_strides_is_refused():
    with pytest.raises(ConfigError, match="strides"):
        build_encoder("vit_tiny_patch16_224", in_chans=1, pretrained=None)


# --------------------------------------------------------------------------- mosaic, crops


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mosaic_puts_tile_k_in_quadrant_k(backend):
    rng = np.random.default_rng(0)
    h, w, c = 4, 6, 3
    images = rng.standard_normal((4, 1, h, w)).astype(np.float32)
    logits = rng.standard_normal((4, c, h, w)).astype(np.float32)
    if backend == "torch":
        images, logits = torch.from_numpy(images), torch.from_numpy(logits)
    from dakd.data.mosaic import mosaic

    img, lg = mosaic(images, logits)
    assert tuple(img.shape) == (1, 2 * h, 2 * w) and tuple(lg.shape) == (c, 2 * h, 2 * w)
    quadrants = {0: (slice(0, h), slice(0, w)), 1: (slice(0, h), slice(w, 2 * w)),
                 2: (slice(h, 2 * h), slice(0, w)), 3: (slice(h, 2 * h), slice(w, 2 * w))}
    for k, (rs, cs) in quadrants.items():
        assert (np.asarray(img[:, rs, cs]) == np.asarray(images[k])).all()
        assert (np.asarray(lg[:, rs, cs]) == np.asarray(logits[k])).all()


def test_random_crop_flip_keeps_image_and_mask_together():
    from dakd.data.mosaic import random_crop_flip

    image = np.arange(20 * 30, dtype=np.int64).reshape(20, 30)
    mask = (image % 7).astype(np.uint8)
    seen_flips = set()
    for seed in range(12):
        img, m = random_crop_flip(image, mask, 8, np.random.default_rng(seed), "sample-1")
        assert img.shape == (8, 8) and m.shape == (8, 8)
        assert (m == img % 7).all()  # same crop and flips on both
        rows, cols = np.diff(img[:, 0]), np.diff(img[0, :])
        assert set(np.abs(rows)) == {30} and set(np.abs(cols)) == {1}  # a contiguous window
        seen_flips.add((rows[0] < 0, cols[0] < 0))
    assert len(seen_flips) > 1
    img, m = random_crop_flip(image, mask, (20, 30), np.random.default_rng(0), "sample-1")
    assert sorted(img.ravel()) == sorted(image.ravel())


def test_random_crop_smaller_image_names_the_sample():
    from dakd.data.mosaic import random_crop_flip

    with pytest.raises(DataError, match="osd/train/img_0042") as err:
        random_crop_flip(np.zeros((10, 40)), np.zeros((10, 40)), 16, np.random.default_rng(0), "osd/train/img_0042")
    assert "10x40" in str(err.value)
