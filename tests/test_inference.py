"""dakd.inference: the one inference device set-up of synthesis, evaluation and prediction."""

from __future__ import annotations

import pytest
import torch

from dakd.inference import autocast, describe_device, inference_device, precision_name, prepare_model


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
