"""Diffusion math: schedule, forward process with b, losses (Eq. 5-7), Eq. 21, samplers
(DDIM of Algorithm 2 and DPM-Solver++): determinism per seed and agreement with an
independent DDIM computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dakd.data.transforms import label_signal
from dakd.diffusion.samplers import (
    SAMPLERS, SampleBatch, initial_noise, logits_to_label_signal, make_sampler_scheduler, sample,
)
from dakd.diffusion.schedule import (
    forward_process, joint_loss, label_loss_fn, make_train_scheduler, q_sample, sample_timesteps, sar_loss,
)
from dakd.models.jointnet import JointNet

torch.set_num_threads(1)

C = 3
SIZE = 32
T_TRAIN = 50


def tiny_model(seed: int = 0) -> JointNet:
    torch.manual_seed(seed)
    return JointNet(in_channels_image=1, num_classes=C, block_out_channels=(8, 16), layers_per_block=1,
                    attention_levels=(1,), norm_num_groups=4, attention_head_dim=4, sample_size=SIZE)


def toy_batch(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.randint(0, C, (batch, SIZE, SIZE), generator=g)
    return x0, mask, g


class ToyJoint(torch.nn.Module):
    """A parameter-free joint denoiser with the JointNet call signature."""

    def __init__(self, num_train_timesteps: int):
        super().__init__()
        self.T = num_train_timesteps

    def forward(self, x, y, t):
        s = (1.0 + t.float() / self.T).view(-1, 1, 1, 1)
        x_hat = torch.tanh(x * s + 0.1 * y.mean(dim=1, keepdim=True))
        logits = 3.0 * y + x
        return x_hat, logits


# ---- schedule and forward process -------------------------------------------------------

def test_train_scheduler_is_squared_cosine_x0_prediction():
    s = make_train_scheduler(T_TRAIN)
    assert s.config.beta_schedule == "squaredcos_cap_v2" and s.config.prediction_type == "sample"
    assert s.config.num_train_timesteps == T_TRAIN
    ab = s.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < ab[0] < 1
    t = sample_timesteps(s, 1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= T_TRAIN - 1


def test_forward_process_uses_b_and_independent_noise():
    s = make_train_scheduler(T_TRAIN)
    x0, mask, g = toy_batch()
    nx = torch.randn(x0.shape, generator=g)
    ny = torch.randn(2, C, SIZE, SIZE, generator=g)
    t = torch.tensor([0, T_TRAIN // 2])
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sig = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    y0 = label_signal(mask, C, 1.0)
    x_lo, y_lo, y0_lo = forward_process(s, x0, mask, 0.5, t, nx, ny)
    x_hi, y_hi, y0_hi = forward_process(s, x0, mask, 1.0, t, nx, ny)
    assert torch.equal(y0_lo, 0.5 * y0) and torch.equal(y0_hi, y0)
    assert torch.equal(x_lo, x_hi)  # b touches the label branch only
    # same noise: the difference is (Δb)·α_t·y0
    torch.testing.assert_close(y_hi - y_lo, (1.0 - 0.5) * a * y0)
    # the closed form, per modality with its own noise
    torch.testing.assert_close(x_lo, a * x0 + sig * nx)
    torch.testing.assert_close(y_lo, a * 0.5 * y0 + sig * ny)
    # the label branch's signal power scales with b² (SNR(y'_t) = b²·SNR(y_t))
    torch.testing.assert_close((a * y0_lo).pow(2).mean(), 0.25 * (a * y0_hi).pow(2).mean())


# ---- losses ---------------------------------------------------------------------------

def test_ce_loss_matches_hand_case_and_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]).T.reshape(1, C, 1, 2)  # 2 pixels
    mask = torch.tensor([[[0, 2]]])
    hand = -(math.log(math.exp(2.0) / (math.exp(2.0) + 1 + math.exp(-1.0))) + math.log(1 / 3)) / 2
    got = label_loss_fn(logits, mask, label_signal(mask, C, 0.5), "ce")
    assert got.item() == pytest.approx(hand, rel=1e-6)
    torch.testing.assert_close(got, F.cross_entropy(logits, mask))
    y0 = label_signal(mask, C, 0.5)
    torch.testing.assert_close(label_loss_fn(logits, mask, y0, "mse"), ((logits - y0) ** 2).mean())
    with pytest.raises(ValueError, match="label_loss"):
        label_loss_fn(logits, mask, y0, "dice")


def test_joint_loss_is_sum_and_uses_model_outputs():
    s = make_train_scheduler(T_TRAIN)
    x0, mask, g = toy_batch()
    nx, ny = torch.randn(x0.shape, generator=g), torch.randn(2, C, SIZE, SIZE, generator=g)
    t = torch.tensor([3, 40])
    model = ToyJoint(T_TRAIN)
    out = joint_loss(model, s, x0, mask, 0.5, t, nx, ny, "ce")
    x_t, y_t, _ = forward_process(s, x0, mask, 0.5, t, nx, ny)
    x_hat, logits = model(x_t, y_t, t)
    torch.testing.assert_close(out["loss_x"], ((x_hat - x0) ** 2).mean())
    torch.testing.assert_close(out["loss_y"], F.cross_entropy(logits, mask))
    torch.testing.assert_close(out["loss"], out["loss_x"] + out["loss_y"])
    # stage 1: SAR-Net alone
    m = tiny_model()
    st1 = sar_loss(m, s, x0, t, nx)
    torch.testing.assert_close(st1["loss"], ((m.sar_forward(q_sample(s, x0, nx, t), t) - x0) ** 2).mean())


@pytest.mark.parametrize("label_loss", ["ce", "mse"])
def test_joint_loss_falls_on_fixed_batch(label_loss):
    s = make_train_scheduler(T_TRAIN)
    m = tiny_model()
    x0, mask, g = toy_batch()
    nx, ny = torch.randn(x0.shape, generator=g), torch.randn(2, C, SIZE, SIZE, generator=g)
    t = sample_timesteps(s, 2, "cpu", generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = joint_loss(m, s, x0, mask, 0.5, t, nx, ny, label_loss)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses[-5:]) < min(losses[:5])


# ---- Eq. 21 ---------------------------------------------------------------------------

def test_logits_to_label_signal_eq21():
    b = 0.528
    logits = torch.randn(2, C, 4, 4, generator=torch.Generator().manual_seed(0))
    got = logits_to_label_signal(logits, b)
    torch.testing.assert_close(got, (torch.softmax(logits, dim=1) * 2 - 1) * b)
    assert got.abs().max() <= b
    # equal logits -> b·(2/C − 1); one dominant class -> b·(2·onehot − 1)
    torch.testing.assert_close(logits_to_label_signal(torch.zeros(1, C, 1, 1), b),
                               torch.full((1, C, 1, 1), b * (2 / C - 1)))
    mask = torch.tensor([[[1]]])
    sharp = 1e4 * F.one_hot(mask, C).movedim(-1, 1).float()
    torch.testing.assert_close(logits_to_label_signal(sharp, b), label_signal(mask, C, b))


# ---- samplers ---------------------------------------------------------------------------

def manual_ddim(ab: torch.Tensor, x_T: torch.Tensor, denoise, steps: int):
    """Independent DDIM (eta = 0, x0-prediction, evenly spaced steps starting at t = T−1,
    α̅_prev = 1 after the last); steps must divide T."""
    T = ab.shape[0]
    assert T % steps == 0
    ratio = T // steps
    x = x_T.clone()
    for t in [T - 1 - i * ratio for i in range(steps)]:
        x0 = denoise(x, t)
        a_t = ab[t]
        a_prev = ab[t - ratio] if t - ratio >= 0 else torch.tensor(1.0)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def test_ddim_all_training_steps_matches_manual_single_modality():
    ab = make_train_scheduler(T_TRAIN).alphas_cumprod
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        return torch.tanh(0.8 * x) * (1 - t / T_TRAIN)

    sched = make_sampler_scheduler("ddim", T_TRAIN)
    sched.set_timesteps(T_TRAIN)
    assert sched.timesteps.tolist() == list(reversed(range(T_TRAIN)))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(denoise(x, int(t)), t, x).prev_sample
    torch.testing.assert_close(x, manual_ddim(ab, x_T, denoise, T_TRAIN), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [T_TRAIN, 10])
def test_joint_ddim_sampler_matches_manual_computation(steps):
    b = 0.5
    model = ToyJoint(T_TRAIN)
    seeds = [11, 12]
    out = sample(model, sampler="ddim", steps=steps, b=b, seeds=seeds, height=8, width=8, device="cpu",
                 num_classes=C, num_train_timesteps=T_TRAIN)
    assert out.nfe == steps

    # independent: both modalities advanced together with the same DDIM formula
    ab = make_train_scheduler(T_TRAIN).alphas_cumprod
    x_T, y_T = initial_noise(seeds, C, 8, 8)
    state = torch.cat([x_T, y_T], dim=1)
    last = {}

    def denoise(z, t):
        x, y = z[:, :1], z[:, 1:]
        x_hat, logits = model(x, y, torch.full((z.shape[0],), t))
        last["logits"] = logits
        y_pred = (torch.softmax(logits, dim=1) * 2 - 1) * b  # Eq. 21
        return torch.cat([x_hat.clamp(-1, 1), y_pred], dim=1)

    final = manual_ddim(ab, state, denoise, steps)
    torch.testing.assert_close(out.images, final[:, :1].clamp(-1, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, last["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.masks, last["logits"].argmax(1).to(torch.uint8))


@pytest.mark.parametrize("label_loss", ["ce", "mse"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_point_mass_denoiser_is_reproduced_exactly(sampler, label_loss):
    """If the data is one point (x̂ ≡ c, label output ≡ L), every consistent solver ends at it."""
    c = 0.3
    L = torch.tensor([0.2, 0.4, -0.5]).view(1, C, 1, 1)  # within [-b, b]: a valid "mse" signal too

    def model(x, y, t):
        return torch.full_like(x, c), L.expand(x.shape[0], C, *x.shape[-2:]).clone()

    steps = 7
    out = sample(model, sampler=sampler, steps=steps, b=0.5, seeds=[1, 2], height=8, width=8, device="cpu",
                 num_classes=C, num_train_timesteps=T_TRAIN, label_loss=label_loss)
    assert isinstance(out, SampleBatch) and out.nfe == steps
    torch.testing.assert_close(out.images, torch.full_like(out.images, c))
    torch.testing.assert_close(out.logits, L.expand(2, C, 8, 8))
    assert out.logits.dtype == torch.float32 and out.logits.shape == (2, C, 8, 8)
    assert out.masks.dtype == torch.uint8 and torch.all(out.masks == int(L.argmax()))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_depends_only_on_its_seed(sampler):
    m = tiny_model()
    with torch.no_grad():  # make the coupling active
        for p in m.interaction_parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    m.eval()
    kw = dict(sampler=sampler, steps=3, b=0.5, height=SIZE, width=SIZE, device="cpu", num_classes=C,
              num_train_timesteps=T_TRAIN)
    many = sample(m, seeds=[1, 2, 3], **kw)
    one = sample(m, seeds=[3], **kw)
    again = sample(m, seeds=[3], **kw)
    assert many.images.shape == (3, 1, SIZE, SIZE) and many.logits.shape == (3, C, SIZE, SIZE)
    assert many.masks.shape == (3, SIZE, SIZE) and many.nfe == one.nfe == 3
    assert torch.equal(one.images, again.images) and torch.equal(one.logits, again.logits)
    torch.testing.assert_close(many.images[2:], one.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(many.logits[2:], one.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(many.images[0], many.images[2])
    assert many.images.abs().max() <= 1


@pytest.mark.parametrize("sampler", ["dpmsolver++", "unipc"])
def test_one_joint_solver_equals_one_solver_per_modality(sampler):
    """The sampler steps the concatenated state (B, 1+C, H, W) with one solver: bit-identical
    to stepping x and y' with a solver each (elementwise steps, per-step scalars)."""
    model = ToyJoint(T_TRAIN)
    b, steps, seeds = 0.5, 6, [4, 5]
    out = sample(model, sampler=sampler, steps=steps, b=b, seeds=seeds, height=8, width=8, device="cpu",
                 num_classes=C, num_train_timesteps=T_TRAIN)
    sx, sy = make_sampler_scheduler(sampler, T_TRAIN), make_sampler_scheduler(sampler, T_TRAIN)
    sx.set_timesteps(steps)
    sy.set_timesteps(steps)
    x, y = initial_noise(seeds, C, 8, 8)
    for t in sx.timesteps:
        x_hat, logits = model(x, y, t.long().expand(2))
        x0 = x_hat.clamp(-1, 1)
        y0 = (torch.softmax(logits, dim=1) * 2 - 1) * b
        x, y = sx.step(x0, t, x).prev_sample, sy.step(y0, t, y).prev_sample
    assert torch.equal(out.images, x.clamp(-1, 1)) and torch.equal(out.logits, logits)


def test_initial_noise_is_per_seed_and_bad_arguments():
    x3, y3 = initial_noise([1, 2, 3], C, 4, 4)
    x1, y1 = initial_noise([3], C, 4, 4)
    assert torch.equal(x3[2:], x1) and torch.equal(y3[2:], y1)
    with pytest.raises(ValueError, match="sampler"):
        make_sampler_scheduler("euler", T_TRAIN)
    with pytest.raises(ValueError, match="steps"):
        sample(ToyJoint(T_TRAIN), sampler="ddim", steps=0, b=0.5, seeds=[1], height=8, width=8,
               device="cpu", num_classes=C, num_train_timesteps=T_TRAIN)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("steps", [200, 30])
def test_sampler_schedules_start_at_T_and_take_the_requested_steps(sampler, steps):
    T = 1000
    s = make_sampler_scheduler(sampler, T)
    s.set_timesteps(steps)
    ts = s.timesteps.tolist()
    assert len(ts) == steps and ts[0] == T - 1 and ts == sorted(ts, reverse=True)
    torch.testing.assert_close(s.alphas_cumprod, make_train_scheduler(T).alphas_cumprod)
