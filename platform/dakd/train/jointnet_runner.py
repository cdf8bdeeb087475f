"""SAR-JointNet's per-worker loop on Ray Train (`JointNetRunner`, on `train.runner`).

Stages run in one global step count: stage 1 trains SAR-Net alone on L_x; stage 2 starts
Label-Net from SAR-Net's (EMA) weights and trains Label-Net + every interaction conv on
L_joint, the rest of SAR-Net frozen; stage 3 trains everything on L_joint at a lower lr.
A restored checkpoint continues where it was, also in the middle of a stage (the
optimizer state is kept when it belongs to the same stage).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from dakd.config import TrainJointNetConfig
from dakd.data.transforms import denormalize_image
from dakd.diffusion.samplers import sample
from dakd.diffusion.schedule import joint_loss, make_train_scheduler, sample_timesteps, sar_loss
from dakd.errors import DakdError
from dakd.models.jointnet import JointNet, check_arch
from dakd.seeds import sample_seed
from dakd import checkpoints as ckpt_io
from dakd.train.ema import EMA
from dakd.train.runner import LoopConfig, TrainLoopRunner, adamw


@dataclass(frozen=True)
class StagePlan:
    stage: int
    start: int  # global step at which the stage starts
    end: int  # global step at which it ends (exclusive)
    lr: float


def plan_stages(cfg: TrainJointNetConfig) -> list[StagePlan]:
    plans, start = [], 0
    for s in cfg.run_stages:
        st = getattr(cfg.stages, f"stage{s}")
        plans.append(StagePlan(s, start, start + st.iterations, st.lr))
        start += st.iterations
    return plans


def build_model(cfg: TrainJointNetConfig, num_classes: int) -> JointNet:
    m = cfg.model
    return JointNet(in_channels_image=1, num_classes=num_classes, block_out_channels=tuple(m.block_out_channels),
                    layers_per_block=m.layers_per_block, attention_levels=tuple(m.attention_levels),
                    norm_num_groups=m.norm_num_groups, attention_head_dim=m.attention_head_dim,
                    sample_size=cfg.crop_size)


def set_trainable(model: JointNet, stage: int) -> list[torch.nn.Parameter]:
    """Freeze everything, then unfreeze what `stage` trains; returns those parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = {
        1: model.sar_parameters,
        2: lambda: model.label_parameters() + model.interaction_parameters(),
        3: lambda: list(model.parameters()),
    }[stage]()
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass(frozen=True, kw_only=True)
class JointNetLoop(LoopConfig):
    """train-jointnet's worker settings: the balancing factor, and the checkpoint of earlier
    stages to start from (`init_checkpoint`, when this run starts at a later stage)."""

    b: float
    init_checkpoint: str | None = None
    init_stages_completed: list[int] = field(default_factory=list)
    init_label_initialised: bool = False


class JointNetRunner(TrainLoopRunner):
    job = "train-jointnet"
    config_model = TrainJointNetConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.model = build_model(cfg, self.classes.num_classes).to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        self.plans = plan_stages(cfg)
        self.total = self.plans[-1].end
        self.scheduler = make_train_scheduler(cfg.num_train_timesteps)
        self.opt_state, self.opt_stage = None, None  # a restored optimizer state and its stage
        self.label_initialised = cfg.run_stages[0] > 2
        self.attempt_start = 0  # where this worker attempt started (0, or the restored step)

    def load_state(self, directory: str, state: dict) -> None:
        check_arch(self.model.arch_dict(), state["arch"])
        self.model.load_state_dict(ckpt_io.load_weights(directory))
        if self.ema is not None:
            self.ema.restore(directory, state, self.model)
        self.opt_state, self.opt_stage = ckpt_io.load_optimizer_state(directory), state["stage"]
        self.step, self.label_initialised = int(state["step"]), bool(state.get("label_initialised"))
        self.attempt_start = self.step
        self.say(f"resumed from step {self.step}/{self.total} (stage {self.opt_stage})")

    def start_fresh(self) -> None:
        if self.loop.init_checkpoint:
            self.model.load_state_dict(ckpt_io.load_weights(self.loop.init_checkpoint))
            self.label_initialised = self.loop.init_label_initialised
            if self.ema is not None:
                self.ema.reset(self.model)

    def checkpoint_meta(self) -> dict:
        cfg, ema = self.cfg, self.ema
        return ckpt_io.teacher_meta(
            self.model, self.classes, step=self.step, b=self.loop.b, num_train_timesteps=cfg.num_train_timesteps,
            label_loss=cfg.label_loss, stage=self.stage.stage, total_steps=self.total,
            stages_completed=[p.stage for p in self.plans if p.end <= self.step] + self.loop.init_stages_completed,
            label_initialised=self.label_initialised, ema_steps=ema.steps if ema else 0,
            attempt_start_step=self.attempt_start, shards=cfg.shards, config=self.loop.config)

    def train(self) -> None:
        for plan in self.plans:
            if self.step < plan.end:
                self.train_stage(plan)

    def train_stage(self, plan: StagePlan) -> None:
        """One stage from the current step to its end: passes over the shard as needed."""
        from torch.nn.parallel import DistributedDataParallel

        self.stage = plan
        if plan.stage >= 2 and not self.label_initialised:
            self.init_label_net()
        self.params = set_trainable(self.model, plan.stage)
        self.net = DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = adamw(self.params, plan.lr, self.cfg.weight_decay)
        if self.opt_state is not None and self.opt_stage == plan.stage and self.step > plan.start:
            self.opt.load_state_dict(self.opt_state)
        self.opt_state = None
        self.window = _Window()
        while self.step < plan.end:
            batches = 0
            for batch in self.batches({"image": torch.float32, "mask": torch.uint8}):
                batches += 1
                self.after_step(self.train_step(batch))
                if self.step >= plan.end:
                    break
            if batches == 0:
                raise DakdError(f"{self.cfg.shards}: the train split gives no full batch of {self.cfg.per_worker_batch} "
                                f"per worker ({self.cfg.num_workers} workers); lower batch_size_per_worker or num_workers")

    def init_label_net(self) -> None:
        """Stage 2 starts Label-Net from SAR-Net's weights (the EMA ones when kept)."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.state_dict())
        self.model.init_label_net_from_sar()
        self.label_initialised = True
        if self.ema is not None:
            self.ema.reset(self.model)

    def train_step(self, batch: dict) -> dict:
        """One optimiser step of the current stage; returns the loss terms."""
        x0, mask, plan = batch["image"], batch["mask"].long(), self.stage
        t = sample_timesteps(self.scheduler, x0.shape[0], self.device)
        noise_x = torch.randn_like(x0)
        with self.autocast():
            if plan.stage == 1:
                out = sar_loss(self.net, self.scheduler, x0, t, noise_x)
            else:
                noise_y = torch.randn((x0.shape[0], self.classes.num_classes, *x0.shape[-2:]), device=self.device)
                out = joint_loss(self.net, self.scheduler, x0, mask, self.loop.b, t, noise_x, noise_y,
                                 self.cfg.label_loss)
        self.optimizer_step(out["loss"], self.params, self.opt, f"stage {plan.stage}")
        if self.ema is not None:
            self.ema.update(self.model)
        self.window.add(out, x0.shape[0] * self.world)
        return out

    def after_step(self, out: dict) -> None:
        """Progress, the periodic log line/metrics, sample grids and checkpoints."""
        cfg, plan, step = self.cfg, self.stage, self.step
        self.progress(f"stage {plan.stage} loss {float(out['loss'].detach()):.4g}")
        if step % cfg.log_every == 0 or step == plan.end:
            metrics = self.window.averages()
            metrics.update({"train/lr": plan.lr, "train/samples_per_s": self.window.rate(), "train/stage": plan.stage})
            self.say(f"stage {plan.stage} step {step}/{self.total} "
                     + " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in metrics.items()))
            if self.logger:
                self.logger.log_metrics(metrics, step)
            self.window = _Window()
        if self.logger and plan.stage >= 2 and (step % cfg.sample_every == 0 or step == self.total):
            self.log_samples()
        if step % cfg.checkpoint_every == 0 or step == plan.end:
            losses = {k: float(v.detach()) for k, v in out.items()}
            self.save_and_report({**losses, "tracking_failures": self.tracking_failures(), "step": step,
                                  "stage": plan.stage}, self.model, self.opt,
                                 self.ema.state_dict() if self.ema else None)
            self.maybe_fail()
        self.maybe_hold()

    def log_samples(self) -> None:
        """Rank 0: a grid of samples from the (EMA) model, logged to MLflow."""
        from dakd.eval.figures import sample_grid

        cfg, net = self.cfg, copy.deepcopy(self.model)
        if self.ema is not None:
            net.load_state_dict(self.ema.state_dict())
        net.eval()
        seeds = [sample_seed(cfg.seed, f"grid/{i}") for i in range(cfg.sample_count)]
        out = sample(net, sampler="ddim", steps=cfg.sample_steps, b=self.loop.b, seeds=seeds, height=cfg.crop_size,
                     width=cfg.crop_size, device=self.device, num_classes=self.classes.num_classes,
                     num_train_timesteps=cfg.num_train_timesteps, label_loss=cfg.label_loss)
        grid = sample_grid(denormalize_image(out.images[:, 0]).cpu().numpy(), out.masks.cpu().numpy(),
                           self.classes.colorize)
        self.logger.log_image(grid, f"samples/step_{self.step:07d}.png")


class _Window:
    """Loss terms averaged since the last log line, and the samples/s over it."""

    def __init__(self):
        self.sums, self.count, self.seen, self.t0 = {}, 0, 0, time.perf_counter()

    def add(self, out: dict, samples: int) -> None:
        self.count += 1
        self.seen += samples
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())

    def averages(self) -> dict:
        return {f"train/{k}": v / self.count for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.seen / max(time.perf_counter() - self.t0, 1e-9)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker of train-jointnet."""
    JointNetRunner(JointNetLoop.from_dict(config)).run()
