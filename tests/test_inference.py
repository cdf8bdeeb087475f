"""dakd.inference: the one inference device set-up of synthesis, evaluation and prediction."""

from __future__ import annotations

import os

import pytest
import torch

from dakd.inference import (autocast, cpu_has_native_bf16, describe_cpu, describe_device, inference_device,
                            precision_name, prepare_model, uses_bf16)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Conv2d(4, 2, 1))


def test_cpu_setup_is_float32_eval_and_unchanged():
    assert inference_device(0).type == "cpu"
    net = _net().train()
    x = torch.randn(2, 1, 8, 8)
    want = net.eval()(x)
    net.train()
    model = prepare_model(net, "cpu")
    assert not model.training  # eval: BatchNorm uses running stats
    with autocast("cpu"):
        got = model(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert precision_name("cpu") == "fp32" and describe_device("cpu") == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_setup_is_bf16_channels_last():
    assert inference_device(1).type == "cuda"
    model = prepare_model(_net(), "cuda")
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 8, 8, device="cuda")
    with autocast("cuda"):
        y = model(x)
    assert y.dtype == torch.bfloat16 and precision_name("cuda") == "bf16-autocast"
    ref = _net().cuda().eval()(x)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


def test_precision_setting_picks_the_autocast():
    from dakd.config import PRECISIONS

    assert PRECISIONS == ("auto", "bf16", "fp32")
    assert [uses_bf16(d, p) for d in ("cpu", "cuda") for p in PRECISIONS] == [False, True, False, True, True, False]
    x = torch.randn(2, 1, 8, 8)
    net = _net().eval()
    for precision, dtype in [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]:
        with autocast("cpu", precision):
            assert net(x).dtype == dtype, precision
    assert isinstance(cpu_has_native_bf16(), bool)
    # benchmark reports name the CPU, its cores and the native bf16 paths that cpu_has_native_bf16 sees
    machine = describe_cpu()
    assert f", {os.cpu_count()} cores, native bf16: " in machine
    assert machine.endswith("native bf16: none") == (not cpu_has_native_bf16()), machine


def test_bf16_training_step_on_cpu_follows_the_fp32_gradient():
    """The sos-cpu student's training step under precision=bf16 on the CPU: float32 weights and
    loss, and a gradient that points where the float32 step's does (cosine > 0.98, norm within 10%)."""
    from dakd.config import SarossModelConfig
    from dakd.models.saross import build_student

    torch.manual_seed(0)
    model = build_student(SarossModelConfig(encoder="resnet18", pretrained=None, decoder_channels=[8, 16, 32],
                                            skip_module="caft", caft_heads=2), 2).train()
    x, y = torch.randn(4, 1, 64, 64), torch.randint(0, 2, (4, 64, 64))

    def gradient(precision):
        model.zero_grad()
        with autocast("cpu", precision):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (l32, g32), (l16, g16) = gradient("fp32"), gradient("bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(float(l16 - l32)) < 0.02 * float(l32)
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.98
    assert abs(float(g16.norm() / g32.norm()) - 1) < 0.1
