"""SAR-JointNet model: zero-conv coupling, Label-Net initialisation, parameter groups,
architecture record, the EMA of its weights. Tiny models (32x32, widths 8/16, 2 levels) on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps
from dakd.errors import ConfigError
from dakd.models.jointnet import JointNet, check_arch

torch.set_num_threads(1)

C = 3
SIZE = 32
TINY = dict(in_channels_image=1, num_classes=C, block_out_channels=(8, 16), layers_per_block=1,
            attention_levels=(1,), norm_num_groups=4, attention_head_dim=4, sample_size=SIZE)


def tiny_model(seed: int = 0, **over) -> JointNet:
    torch.manual_seed(seed)
    return JointNet(**{**TINY, **over})


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, SIZE, SIZE, generator=g)
    y = torch.randn(batch, C, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, y, t


def test_shapes_and_sar_forward():
    m = tiny_model()
    x, y, t = inputs()
    x0, logits = m(x, y, t)
    assert x0.shape == x.shape and logits.shape == y.shape
    assert m.sar_forward(x, t).shape == x.shape
    x0_alone, none = m(x, None, t)
    assert none is None and torch.equal(x0_alone, m.sar_forward(x, t))


def test_coupled_sar_output_equals_uncoupled_at_init():
    m = tiny_model()
    x, y, t = inputs()
    coupled, logits = m(x, y, t)
    assert torch.equal(coupled, m.sar_forward(x, t))
    # and whatever the label input is, SAR-Net does not see it; Label-Net does not see x
    _, y2, _ = inputs(seed=7)
    x2, _, _ = inputs(seed=8)
    assert torch.equal(m(x, y2, t)[0], coupled)
    assert torch.equal(m(x2, y, t)[1], logits)
    assert all(torch.count_nonzero(p) == 0 for p in m.interaction_parameters())


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("branch,coupling,affects", [
    ("sar", "joint_in", "sar"),        # label input -> SAR first conv
    ("sar", "joint_skips", "label"),   # SAR skips -> Label-Net decoder
    ("sar", "joint_mid", "label"),     # SAR mid -> Label-Net decoder
    ("label", "joint_in", "label"),    # image input -> Label-Net first conv
    ("label", "joint_skips", "sar"),   # Label-Net skips -> SAR decoder
    ("label", "joint_mid", "sar"),     # Label-Net mid -> SAR decoder
])
def test_each_coupling_conv_feeds_exactly_the_other_branch(branch, coupling, affects):
    m = tiny_model()
    x, y, t = inputs()
    base = dict(zip(("sar", "label"), m(x, y, t)))
    _perturb(getattr(getattr(m, branch), coupling), seed=3)
    after = dict(zip(("sar", "label"), m(x, y, t)))
    other = "label" if affects == "sar" else "sar"
    assert not torch.allclose(after[affects], base[affects])
    assert torch.equal(after[other], base[other])


def test_every_skip_has_a_coupling_conv():
    m = tiny_model(block_out_channels=(8, 16, 16), layers_per_block=2, attention_levels=(2,))
    x, y, t = inputs()
    temb = m.sar.time_embed(t, x.shape[0], x.dtype)
    _, skips = m.sar.encode(x, temb)
    assert len(skips) == len(m.sar.joint_skips) == len(m.label.joint_skips)
    assert [s.shape[1] for s in skips] == [c.in_channels for c in m.sar.joint_skips]


def test_init_label_net_from_sar_copies_all_but_io_convs():
    m = tiny_model()
    _perturb(m.label.joint_mid, seed=5)  # coupling convs must be left as they are
    label_before = {k: v.clone() for k, v in m.label.state_dict().items()}
    copied = m.init_label_net_from_sar()
    sar, label = m.sar.state_dict(), m.label.state_dict()
    assert copied
    for name, value in label.items():
        if name.startswith(("conv_in.", "conv_out.", "joint_")):
            assert name not in copied
            assert torch.equal(value, label_before[name]), name
        else:
            assert name in copied
            assert torch.equal(value, sar[name]), name
    # the new input/output convs have C channels, SAR-Net's have 1
    assert label["conv_in.weight"].shape[1] == C and sar["conv_in.weight"].shape[1] == 1
    assert label["conv_out.weight"].shape[0] == C and sar["conv_out.weight"].shape[0] == 1


def test_parameter_groups_partition_the_model():
    m = tiny_model()
    groups = [m.sar_parameters(), m.label_parameters(), m.interaction_parameters()]
    ids = [{id(p) for p in g} for g in groups]
    assert all(len(a & b) == 0 for i, a in enumerate(ids) for b in ids[i + 1:])
    assert set().union(*ids) == {id(p) for p in m.parameters()}
    assert {id(p) for p in m.sar.parameters()} >= ids[0]


def test_stage2_freezing_keeps_sar_bit_identical():
    """Stage 2: optimizer over Label-Net + coupling convs only; L_joint drives both."""
    m = tiny_model()
    m.init_label_net_from_sar()
    sched = make_train_scheduler(50)
    sar_before = [p.detach().clone() for p in m.sar_parameters()]
    label_before = [p.detach().clone() for p in m.label_parameters()]
    inter_before = [p.detach().clone() for p in m.interaction_parameters()]
    # no weight decay: every change below comes from the gradients of L_joint
    opt = torch.optim.AdamW(m.label_parameters() + m.interaction_parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.randint(0, C, (2, SIZE, SIZE), generator=g)
    for _ in range(3):
        t = sample_timesteps(sched, 2, "cpu", generator=g)
        nx = torch.randn(x0.shape, generator=g)
        ny = torch.randn(2, C, SIZE, SIZE, generator=g)
        loss = joint_loss(m, sched, x0, mask, 0.5, t, nx, ny, "ce")["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.sar_parameters(), sar_before))
    assert all(not torch.equal(p, q) for p, q in zip(m.interaction_parameters(), inter_before))
    assert all(not torch.equal(p, q) for p, q in zip(m.label_parameters(), label_before))


def test_arch_round_trip_and_mismatch_errors():
    m = tiny_model()
    arch = json.loads(json.dumps(m.arch_dict()))
    m2 = JointNet.from_arch(arch)
    check_arch(m.arch_dict(), m2.arch_dict())
    assert m2.state_dict().keys() == m.state_dict().keys()
    assert all(m2.state_dict()[k].shape == v.shape for k, v in m.state_dict().items())
    m2.load_state_dict(m.state_dict())

    with pytest.raises(ConfigError, match="num_classes"):
        check_arch(m.arch_dict(), tiny_model(num_classes=5).arch_dict())
    with pytest.raises(ConfigError, match="block_out_channels"):
        check_arch(m.arch_dict(), tiny_model(block_out_channels=(8, 8)).arch_dict())
    with pytest.raises(ConfigError, match="architecture"):
        JointNet.from_arch({**arch, "name": "other-net"})


def test_invalid_arguments_and_sizes():
    with pytest.raises(ConfigError, match="norm_num_groups"):
        tiny_model(block_out_channels=(6, 16))
    with pytest.raises(ConfigError, match="attention_levels"):
        tiny_model(attention_levels=(2,))
    m = tiny_model()
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.zeros(1, 1, 33, 32), None, torch.zeros(1, dtype=torch.long))


def test_ema_update_matches_the_formula_per_tensor():
    """EMA.update (fused) against shadow + (1 - decay_t)(w - shadow) computed tensor by tensor,
    with diffusers' warm-up decay_t = min(decay, (1 + t) / (10 + t)); integer buffers copied as integers."""
    from dakd.train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
    ema = EMA(model, decay=0.9)
    expected = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                for k, v in model.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 2, 8, 8))  # moves the BatchNorm running stats and its step counter
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            expected[k] = expected[k] + (1 - d) * (v.float() - expected[k]) if v.dtype.is_floating_point else v.clone()
    for k, v in ema.state_dict().items():
        assert v.dtype == expected[k].dtype and torch.allclose(v, expected[k], atol=1e-6), k
    counter = ema.state_dict()["1.num_batches_tracked"]
    assert counter.dtype == torch.int64 and counter.item() == 4  # integer buffers keep their dtype
