#!/usr/bin/env python
"""Does Self-NPO make images better? Plain CFG vs CFG with a Self-NPO negative, on a model trained here.

Everything runs on the CPU, offline, in about 11 minutes on one core (more when the machine is busy):

- data: scikit-learn's bundled 8×8 digits (1797 images, 10 classes; ``load_digits`` reads a file that ships
  inside the wheel, nothing is downloaded), pixels 0..16 scaled to [−1, 1];
- model: a small class-conditional eps-prediction MLP (~100k parameters; 11 class tokens: 10 digits + a
  null token, the unconditional/negative conditioning, used for 15 % of the training samples), the discrete
  VP ``scaled_linear`` schedule with T = 1000 (SD's), 2000 AdamW steps, EMA weights. It is deliberately
  small: CFG helps it (as it helps real text-to-image models), and plain CFG's best scale is about 1.2–1.4;
- sampler: deterministic DDIM (= Euler in ν, VE space), 20 steps, CFG with the uncond from the NPO network:
  x0 = x0_neg + s·(x0_pos − x0_neg), x0_pos from the base model with the class, x0_neg from the negative
  model with the null token. Plain CFG: negative model = base model. Self-NPO: negative model = θ + β·δ,
  δ = TDFT student − base, trained with the pack's ``training.trainer.train`` (all weights, K = 5, w = −1,
  EMA teacher 0.999, pseudo-Huber, AdamW lr 2e-5, batch 64). The same noise, labels and sampler for all;
- metric: a small MLP classifier trained on the digits (fixed seed, ~98 % held-out accuracy) gives
  32-d features. "class-cond. FD": the Fréchet distance of each class's samples to that class's real
  images in that feature space, averaged over the 10 classes (a class-conditional FID; lower is better).
  "FD": all samples against all real images (the usual FID set-up). "accuracy": the classifier agrees with
  the label the sample was drawn for. Samples are clipped to the pixel range first, like written images.

Self-NPO variants (where the paper and the authors' code differ): the student conditioned on the class ("prompt", the
authors' code) or on the null token ("negative", the branch NPO later queries), the truncated rollouts
starting from the training images ("data", the authors' code) or from 2000 samples of the base model
drawn with plain CFG 1.5 ("self", the pack's data-free pool). Controls: "placebo", a random δ with the
per-tensor norms of the negative/self δ (is it Self-NPO or any change of the negative branch?), and plain
CFG with its scale picked on the test noise itself ("oracle": an optimistic bound for plain CFG).

Flow base (``--base flow``): the same network predicts the velocity v = ε − x0 of rectified flow, x_t =
(1 − t)·x0 + t·ε, on ComfyUI's ModelSamplingDiscreteFlow table with shift 3 (SD3's: t_i = 3τ / (1 + 2τ),
τ = i/1000), t drawn uniformly over that table in training (800 steps: see ``full_config``); the sampler is
ComfyUI's euler on CONST (x ← x0 + (t_next/t)·(x − x0), from pure noise at t = 1), 20 steps evenly spaced
over the table. Self-NPO runs the pack's flow TDFT (``training.schedules.FlowSchedule``: the teacher's
Euler rollout on the table's 25-point grid, the marginal-preserving re-noising, the x0 target), lr 1e-4.
Everything else (data, metric, variants, controls, protocol) is the VP run's.

Preference (``--methods … preference``, on by default): Diffusion-NPO's way, the authors' reversed Diffusion-DPO,
on pairs the model makes itself (as the pack's NPO Self-Generated Pairs): per class, ``pref_groups`` groups
of K = ``pref_k`` samples of the base model with plain CFG ``pref_cfg`` (the benchmark's sampler; 25 × 8 × 10
= 2000 samples, the same sampling cost as the "self" pool), scored by the metric's classifier (the SCORER:
log p(intended class | clipped sample), in float64); each group's best and worst (``training.pairs.best_and_worst``)
form a pair, and the pack's ``training.trainer.Trainer.run_preference`` (``training.preference``: the
rejected sample in DPO's winner slot, one level and one noise per pair, levels uniform over the model's own
table, eps target on VP, velocity target on flow, loss −log σ(β_DPO·logits)) trains all weights of a copy of
the base (AdamW, batch 64 pairs, grad clip 1), the reference being the frozen base weights (a second copy:
the toy has no adapter to switch off). δ = policy − base, θ_neg = θ + β·δ as for Self-NPO. Tuned on
validation like Self-NPO: β_DPO ∈ {500, 5000}, lr ∈ {5e-6, 2e-5, 1e-4} (flow: {2e-5, 1e-4, 5e-4}; both
grids placed on development base seed 7), steps ∈ {50, 200} (one step, 64 pairs: 128
passes without and 128 with grad, 0.93× a TDFT step's forward-equivalents, so equal steps ≈ equal compute),
strength β ∈ {1, 2, 4}, the scale grid. Its placebo: a random δ with the per-tensor norms of the δ the
preference chose, strength and scale tuned. Every method's model passes (sampling included) are counted.

Protocol. Each objective (class-cond. FD, FD) is tuned separately. Per base-model seed, on *validation*
noise shared by all methods: plain CFG's scale on a grid (steps of 0.05 around the optimum), every
Self-NPO variant's (scale, training steps ∈ {50, 200}, strength β ∈ {1, 2, 4}: the nodes' range is 0–4)
on the same scale grid, using Self-NPO training seed 0. Extra rows "…, β≤8" also allow β = 8, above what
the nodes accept. The learning rate (2e-5) was chosen in development on a separate base-model seed.
Test: each (base seed, Self-NPO training seed) unit draws fresh test noise, used by plain CFG and every
method alike (seed 0's δ is the one tuned on; seeds 1 and 2 are trained anew with the chosen steps), so
each unit gives one paired difference per method. Reported: mean ± std over units, the mean paired
difference with a 95 % t-interval, the paired t-test p-value (units sharing a base model are treated as
independent) and how many units improved.

    pip install -r benchmarks/requirements.txt   # scikit-learn (for the digits), scipy
    python benchmarks/bench_quality.py [--base vp|flow] [--quick] [--methods M,…] [--json out.json] [--md out.md]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import linalg, stats
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
NULL = 10  # the null class token (unconditional / negative conditioning)


def import_pack():
    """Register the repository as the package ``comfyui_npo`` (scripts/npo_headless does it) and import it."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import npo_headless

    npo_headless.register_pack()

    from comfyui_npo.npo_core.schedule import DiscreteSchedule
    from comfyui_npo.training.data import StartData
    from comfyui_npo.training.pairs import PairData, best_and_worst
    from comfyui_npo.training.preference import PreferenceConfig
    from comfyui_npo.training.schedules import VPSchedule, make_schedule
    from comfyui_npo.training.tdft import TDFTConfig
    from comfyui_npo.training.trainer import Callbacks, TrainConfig, Trainer, train

    return (DiscreteSchedule, make_schedule, VPSchedule, StartData, TDFTConfig, Callbacks, TrainConfig, train,
            Trainer, PairData, best_and_worst, PreferenceConfig)


(DiscreteSchedule, make_schedule, VPSchedule, StartData, TDFTConfig, Callbacks, TrainConfig, train, Trainer, PairData,
 best_and_worst, PreferenceConfig) = import_pack()


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    base: str = "vp"  # the base model's process: "vp" (eps, discrete VP) or "flow" (rectified flow, v)
    flow_shift: float = 3.0  # flow only: ComfyUI's ModelSamplingDiscreteFlow shift (SD3's default)
    base_seeds: list[int] = field(default_factory=lambda: [0, 1])
    npo_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # the first one is also used for tuning
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    placebo: bool = True
    # base model
    width: int = 96
    depth: int = 2
    base_steps: int = 2000
    base_batch: int = 128
    base_lr: float = 2e-3
    base_ema: float = 0.998
    p_uncond: float = 0.15
    # sampler
    sample_steps: int = 20
    # Self-NPO (TDFT) training; the checkpoints are taken from one run
    npo_steps: list[int] = field(default_factory=lambda: [50, 200])
    npo_batch: int = 64
    npo_lr: float = 2e-5
    npo_weight_decay: float = 1e-3
    npo_ema: float = 0.999
    npo_k: int = 5
    npo_w: float = -1.0
    pool_size: int = 2000  # data-free start: samples of the base model (classes cycling) ...
    pool_cfg: float = 1.5  # ... drawn with plain CFG at this scale
    strengths: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # β in θ_neg = θ + β·δ (node: 0..4)
    extra_strengths: list[float] = field(default_factory=lambda: [8.0])  # beyond the node's range: extra rows
    # Diffusion-NPO (reversed Diffusion-DPO) on self-generated pairs; its own placebo comes with it
    preference: bool = True
    pref_groups: int = 25  # pairs per class: groups of pref_k samples, the best and the worst of each
    pref_k: int = 8  # samples per group (10 × 25 × 8 = 2000 = pool_size: the "self" pool's sampling cost)
    pref_cfg: float = 1.5  # plain CFG scale of the pair samples (= pool_cfg)
    pref_steps: list[int] = field(default_factory=lambda: [50, 200])  # a step costs 0.93× a TDFT step's passes
    pref_betas: list[float] = field(default_factory=lambda: [500.0, 5000.0])  # β_DPO (the authors' SD1.5: 500)
    pref_lrs: list[float] = field(default_factory=lambda: [5e-6, 2e-5, 1e-4])  # flow: ×5 (see full_config)
    pref_batch: int = 64  # pairs per step (the authors' 64)
    pref_loss: str = "sigmoid"
    # evaluation
    scales: list[float] = field(default_factory=lambda: [1.0, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.6,
                                                         1.8, 2.0])
    oracle_window: float = 0.1
    objectives: list[str] = field(default_factory=lambda: ["cfd", "fd"])  # each tuned separately
    n_val: int = 1000
    n_test: int = 5000
    feat_dim: int = 32


VARIANTS = {
    "prompt/data": "student on the class, start from the training images (the authors' code)",
    "prompt/self": "student on the class, start from the model's own samples",
    "negative/data": "student on the null token, start from the training images",
    "negative/self": "student on the null token, start from the model's own samples (data-free)",
}
PLACEBO = "placebo"  # θ + β·(random direction with the per-tensor norms of the negative/self δ)
NODE_STRENGTH_MAX = 4.0  # the strength range of the pack's nodes (nodes/common.py STRENGTH_MAX)
EXT = ", β≤"  # "<variant>, β≤8": the variant tuned with the extra strengths as well
ORACLE = "plain_oracle"  # plain CFG, its scale picked on the test noise itself (within ±oracle_window of the tuned one)
METRICS = {"cfd": "class-cond. FD ↓", "fd": "FD ↓", "acc": "accuracy ↑"}


def full_config(base: str = "vp") -> Config:
    """The reported run. The flow base trains 800 steps, not 2000: trained to 2000 steps on these digits, CFG
    barely helps it (class-cond. FD at cfg 1 within 5 % of the best scale), unlike real text-to-image
    models; its Self-NPO learning rate, 1e-4, was picked on a development base seed (7) not in the report. The
    preference learning-rate grids (VP 5e-6…1e-4, flow 2e-5…5e-4) bracket the best validation lr on seed 7."""
    if base == "flow":
        return Config(base=base, base_steps=800, npo_lr=1e-4, pref_lrs=[2e-5, 1e-4, 5e-4])
    return Config(base=base)


def quick_config(base: str = "vp") -> Config:
    """A smoke test (about a minute): one base model, two Self-NPO seeds, few steps and samples."""
    return Config(base=base, base_seeds=[0], npo_seeds=[0, 1], base_steps=400, npo_steps=[10, 30], strengths=[1.0],
                  extra_strengths=[2.0], scales=[1.0, 1.25, 1.5, 2.0], pool_size=300, n_val=300, n_test=500,
                  pref_groups=5, pref_k=4, pref_steps=[10, 30], pref_betas=[500.0, 5000.0], pref_lrs=[1e-4])


# ---------------------------------------------------------------------------------------------
# data and the metric's feature network
# ---------------------------------------------------------------------------------------------
def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_load_digits  # bundled with scikit-learn, offline

    d = sk_load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0
    return x.view(-1, 1, 8, 8), torch.tensor(d.target, dtype=torch.long)


class Classifier(nn.Module):
    def __init__(self, feat_dim: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Linear(256, feat_dim), nn.SiLU())
        self.head = nn.Linear(feat_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, feat_dim: int, seed: int = 1234) -> tuple[Classifier, float]:
    """Fixed-seed feature network; returns it and its accuracy on a held-out 15 % of the digits."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_te = int(0.15 * x.shape[0])
    te, tr = perm[:n_te], perm[n_te:]
    clf = Classifier(feat_dim)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    for _ in range(1500):
        idx = tr[torch.randint(0, tr.numel(), (128,), generator=g)]
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)  # light noise: robust to imperfect samples
        loss = nn.functional.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(x[te]).argmax(1) == y[te]).float().mean().item()
    return clf, acc


def gauss_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    (m1, s1), (m2, s2) = a, b
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Metric:
    """Fréchet distances in the classifier's feature space, to the 1797 real digits."""

    def __init__(self, clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> None:
        self.clf = clf
        with torch.no_grad():
            f = clf.features(x).double().numpy()
        self.real_all = gauss_stats(f)
        self.real_cls = [gauss_stats(f[(y == c).numpy()]) for c in range(10)]

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        s = samples.clamp(-1, 1)  # an image is clipped to its pixel range when it is written out
        f = self.clf.features(s)
        acc = (self.clf.head(f).argmax(1) == labels).float().mean().item()
        f = f.double().numpy()
        lab = labels.numpy()
        cfd = float(np.mean([frechet(gauss_stats(f[lab == c]), self.real_cls[c]) for c in range(10)]))
        return {"cfd": cfd, "fd": frechet(gauss_stats(f), self.real_all), "acc": acc}


# ---------------------------------------------------------------------------------------------
# the diffusion model: one network, eps prediction (VP) or velocity prediction (flow), as a denoiser
# D(x, level, cond) -> x0 through its process
# ---------------------------------------------------------------------------------------------
PASSES = {"forward": 0, "grad": 0}  # network evaluations of one image: without grad, and with grad (+ a backward)


def passes_now() -> dict[str, int]:
    return dict(PASSES)


def passes_since(p0: dict[str, int]) -> dict[str, int]:
    return {k: PASSES[k] - p0[k] for k in PASSES}


class EpsNet(nn.Module):
    """The class-conditional MLP; its output is eps (VP) or v (flow), the level enters through log(level)."""

    def __init__(self, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(32.0), 16)), persistent=False)
        self.t_emb = nn.Sequential(nn.Linear(32, width), nn.SiLU(), nn.Linear(width, width))
        self.c_emb = nn.Embedding(11, width)
        self.inp = nn.Linear(64, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 64))

    def forward(self, x: torch.Tensor, nu: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        PASSES["grad" if torch.is_grad_enabled() else "forward"] += x.shape[0]
        a = torch.log(nu)[:, None] * self.freqs
        emb = self.t_emb(torch.cat([a.sin(), a.cos()], 1)) + self.c_emb(cond)
        h = self.inp(x.flatten(1))
        for n, f1, f2 in zip(self.norms, self.fc1, self.fc2, strict=True):
            h = h + f2(nn.functional.silu(f1(n(h) + emb)))
        return self.out(h).view_as(x)


class VPProcess:
    """Discrete VP, eps prediction, SD's ``scaled_linear`` table (T = 1000), in VE space: x = x0 + ν·ε, the
    network sees x / √(ν² + 1) (ComfyUI's EPS ``calculate_input``), x0 = x − ν·eps. Levels are ν."""

    kind = "vp"

    def __init__(self) -> None:
        table = DiscreteSchedule.scaled_linear()
        self.schedule = VPSchedule(table)  # what TDFT and the preference step run on (``training.trainer``)
        self.levels_table = table.nus.float()

    def training_example(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(network input, level, regression target) for clean x0, level drawn uniformly over the table."""
        nu = self.levels_table[torch.randint(0, self.levels_table.numel(), (x0.shape[0],), generator=g)]
        eps = torch.randn(x0.shape, generator=g)
        return (x0 + nu.view(-1, 1, 1, 1) * eps) / torch.sqrt(nu**2 + 1).view(-1, 1, 1, 1), nu, eps

    def denoiser(self, net: EpsNet):
        def denoise(x_ve: torch.Tensor, nu: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            shape = (-1,) + (1,) * (x_ve.dim() - 1)
            eps = net(x_ve / torch.sqrt(nu**2 + 1).view(shape), nu, cond)
            return x_ve - nu.view(shape) * eps

        return denoise


class FlowProcess:
    """Rectified flow, v prediction (ComfyUI CONST): x_t = (1 − t)·x0 + t·ε, v = ε − x0, x0 = x_t − t·v, on
    ComfyUI's ModelSamplingDiscreteFlow table: t_i = shift·τ / (1 + (shift − 1)·τ), τ = i/1000, i = 1..1000.
    The network sees x_t itself (CONST ``calculate_input`` is the identity). Levels are t."""

    kind = "flow"

    def __init__(self, shift: float) -> None:
        tau = torch.arange(1, 1001, dtype=torch.float64) / 1000
        table = shift * tau / (1 + (shift - 1) * tau)
        self.levels_table = table.float()
        self.schedule = make_schedule("flow", table)

    def training_example(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        t = self.levels_table[torch.randint(0, self.levels_table.numel(), (x0.shape[0],), generator=g)]
        eps = torch.randn(x0.shape, generator=g)
        tt = t.view(-1, 1, 1, 1)
        return (1 - tt) * x0 + tt * eps, t, eps - x0

    def denoiser(self, net: EpsNet):
        def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return x_t - t.view((-1,) + (1,) * (x_t.dim() - 1)) * net(x_t, t, cond)

        return denoise


Process = VPProcess | FlowProcess


def process_of(cfg: Config) -> Process:
    if cfg.base == "vp":
        return VPProcess()
    if cfg.base == "flow":
        return FlowProcess(cfg.flow_shift)
    raise SystemExit(f"--base must be vp or flow, got {cfg.base!r}")


def train_base(proc: Process, x: torch.Tensor, y: torch.Tensor, cfg: Config, seed: int) -> EpsNet:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = EpsNet(cfg.width, cfg.depth)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.base_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.base_lr, total_steps=cfg.base_steps, pct_start=0.05)
    for step in range(cfg.base_steps):
        idx = torch.randint(0, x.shape[0], (cfg.base_batch,), generator=g)
        x0, c = x[idx], y[idx].clone()
        c[torch.rand(cfg.base_batch, generator=g) < cfg.p_uncond] = NULL
        x_in, level, target = proc.training_example(x0, g)
        loss = (net(x_in, level, c) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rate = max(1.0 - cfg.base_ema, 1.0 / (step + 2))  # EMA with warm-up: early weights fade out
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, rate)
    return ema.eval()


# ---------------------------------------------------------------------------------------------
# sampling: deterministic DDIM / Euler with two-network CFG
# ---------------------------------------------------------------------------------------------
def sampling_levels(proc: Process, steps: int) -> torch.Tensor:
    """``steps`` table levels evenly spaced in index from the noisiest down to the first, then 0."""
    i = torch.linspace(proc.levels_table.numel() - 1, 0, steps).round().long()
    return torch.cat([proc.levels_table[i], torch.zeros(1)])


@torch.no_grad()
def sample(proc: Process, pos: EpsNet, neg: EpsNet, labels: torch.Tensor, scale: float, noise: torch.Tensor,
           steps: int) -> torch.Tensor:
    """x ← x0 + (l_next / l)·(x − x0): DDIM in VE space (VP) and ComfyUI's euler on CONST (flow) are both
    this step; the start is l_max·noise (VP: ν_max·ε; flow: t = 1, pure noise)."""
    levels = sampling_levels(proc, steps)
    d_pos, d_neg = proc.denoiser(pos), proc.denoiser(neg)
    null = torch.full_like(labels, NULL)
    x = noise * levels[0]
    for i in range(steps):
        lv = levels[i].expand(x.shape[0])
        if scale == 1.0:
            x0 = d_pos(x, lv, labels)
        elif neg is pos:  # one batched call, as a sampler does
            x0_p, x0_n = d_pos(torch.cat([x, x]), torch.cat([lv, lv]), torch.cat([labels, null])).chunk(2)
            x0 = x0_n + scale * (x0_p - x0_n)
        else:
            x0_p, x0_n = d_pos(x, lv, labels), d_neg(x, lv, null)
            x0 = x0_n + scale * (x0_p - x0_n)
        x = x0 + (levels[i + 1] / levels[i]) * (x - x0)
    return x


def noise_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def with_offset(base: EpsNet, student_sd: dict[str, torch.Tensor], beta: float) -> EpsNet:
    """θ_neg = θ + β·(θ_student − θ)."""
    neg = copy.deepcopy(base)
    sd = base.state_dict()
    neg.load_state_dict({k: sd[k] + beta * (student_sd[k] - sd[k]) for k in sd})
    return neg


def placebo_offset(base: EpsNet, student_sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """θ + a random direction with the same per-tensor Frobenius norms as (student − θ)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.state_dict().items():
        d = student_sd[k] - v
        r = torch.randn(d.shape, generator=g)
        out[k] = v + r * (d.norm() / r.norm().clamp_min(1e-12))
    return out


def source_of(method: str) -> str:
    """Whose validation rows and offsets a method uses ("<variant>, β≤8" → the variant)."""
    return method.split(EXT)[0]


def trained_as(method: str) -> str:
    """Which Self-NPO training run a method needs (the placebo takes its norms from negative/self)."""
    if method == PLACEBO:
        return "negative/self"
    return PREF if method == PREF_PLACEBO else source_of(method)


def placebo_seed(base_seed: int, npo_seed: int, step: int) -> int:
    return 40_000 + 1000 * base_seed + 100 * npo_seed + step


# ---------------------------------------------------------------------------------------------
# Self-NPO via the pack's trainer
# ---------------------------------------------------------------------------------------------
def self_npo(proc: Process, base: EpsNet, start: torch.Tensor, start_labels: torch.Tensor, variant: str, cfg: Config,
             seed: int, steps: list[int], passes: dict | None = None) -> tuple[dict[int, dict[str, torch.Tensor]],
                                                                                list[float]]:
    """TDFT on a copy of ``base`` (``training.trainer.train``, all weights); its state dicts at ``steps``;
    ``passes`` gets the model passes spent up to each of them."""
    student = copy.deepcopy(base)
    params = dict(student.named_parameters())
    data = StartData(start, [torch.tensor([c]) for c in range(10)], torch.tensor([NULL]), start_labels, seed)
    tcfg = TrainConfig(steps=max(steps), batch_size=cfg.npo_batch, learning_rate=cfg.npo_lr,
                       weight_decay=cfg.npo_weight_decay, grad_clip=1.0, ema_decay=cfg.npo_ema, seed=seed,
                       tdft=TDFTConfig(truncation_steps=cfg.npo_k, teacher_guidance=cfg.npo_w,
                                       student_cond=variant.split("/")[0]))
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    want = set(steps)
    p0 = passes_now()

    def on_step(step: int, total: int, loss: float) -> None:
        if step in want:
            snaps[step] = {k: v.detach().clone() for k, v in student.state_dict().items()}
            if passes is not None:
                passes[step] = passes_since(p0)

    res = train(proc.denoiser(student), proc.schedule, params, data, tcfg, Callbacks(on_step=on_step))
    return snaps, res.losses


# ---------------------------------------------------------------------------------------------
# Diffusion-NPO: reversed Diffusion-DPO (the pack's training.preference via Trainer.run_preference)
# on pairs the base model makes and the classifier ranks
# ---------------------------------------------------------------------------------------------
PREF = "preference"
PREF_PLACEBO = "placebo/preference"  # θ + β·(random direction with the per-tensor norms of the preference δ)
PREF_METHODS = (PREF, PREF_PLACEBO)


@torch.no_grad()
def self_generated_pairs(proc: Process, base: EpsNet, clf: Classifier, cfg: Config, seed: int) -> tuple[dict, dict]:
    """Per class, ``pref_groups`` groups of ``pref_k`` plain-CFG samples scored by log p(class | sample); each
    group's best and worst (``training.pairs.best_and_worst``) are its (preferred, rejected) pair, as sampled."""
    n, k = 10 * cfg.pref_groups, cfg.pref_k
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n * k, 1, 8, 8, generator=g)
    labels = (torch.arange(n) % 10).repeat_interleave(k)
    p0 = passes_now()
    xs = sample(proc, base, base, labels, cfg.pref_cfg, noise, cfg.sample_steps)
    cost = passes_since(p0)
    # in float64: a confident float32 log-softmax rounds to exactly 0 and would tie
    logp = torch.log_softmax(clf(xs.clamp(-1, 1)).double(), 1).gather(1, labels[:, None])[:, 0]
    best, worst = [], []
    for q in range(n):
        hi, lo = best_and_worst(logp[q * k:(q + 1) * k].tolist(), f"class {q % 10}, group {q // 10}")
        best.append(q * k + hi)
        worst.append(q * k + lo)
    bi, wi = torch.tensor(best), torch.tensor(worst)
    acc = (clf(xs.clamp(-1, 1)).argmax(1) == labels).float()
    stats_ = {"pairs": n, "samples": n * k, "passes": cost, "logp_preferred": float(logp[bi].mean()),
              "logp_rejected": float(logp[wi].mean()), "acc_all": float(acc.mean()),
              "acc_preferred": float(acc[bi].mean()), "acc_rejected": float(acc[wi].mean())}
    return {"preferred": xs[bi], "rejected": xs[wi], "prompt_of": torch.arange(n) % 10}, stats_


def preference_npo(proc: Process, base: EpsNet, pairs: dict, cfg: Config, seed: int, dpo_beta: float, lr: float,
                   steps: list[int], passes: dict | None = None) -> tuple[dict[int, dict[str, torch.Tensor]],
                                                                          list[float]]:
    """Reversed DPO on a copy of ``base`` (all weights) against the frozen base; state dicts at ``steps``."""
    policy = copy.deepcopy(base)
    params = dict(policy.named_parameters())
    d_policy, d_ref = proc.denoiser(policy), proc.denoiser(base)
    off = [False]

    def denoise(x: torch.Tensor, level: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (d_ref if off[0] else d_policy)(x, level, cond)

    @contextlib.contextmanager
    def adapter_off():
        off[0] = True
        try:
            yield
        finally:
            off[0] = False

    data = PairData(pairs["preferred"], pairs["rejected"], [torch.tensor([c]) for c in range(10)], pairs["prompt_of"],
                    seed)
    pcfg = PreferenceConfig(beta=dpo_beta, loss_type=cfg.pref_loss, prediction="flow" if proc.kind == "flow" else "eps")
    tcfg = TrainConfig(steps=max(steps), batch_size=cfg.pref_batch, learning_rate=lr,
                       weight_decay=cfg.npo_weight_decay, grad_clip=1.0, seed=seed, objective="preference",
                       preference=pcfg)
    snaps: dict[int, dict[str, torch.Tensor]] = {}
    want = set(steps)
    p0 = passes_now()

    def on_step(step: int, total: int, loss: float) -> None:
        if step in want:
            snaps[step] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
            if passes is not None:
                passes[step] = passes_since(p0)

    res = Trainer(proc.schedule, tcfg).run_preference(denoise, adapter_off, params, data, Callbacks(on_step=on_step))
    return snaps, res.losses


def preference_runs(proc: Process, base: EpsNet, pairs: dict, cfg: Config, seed: int, keys: set | None,
                    rec: dict | None = None) -> dict[tuple, dict[str, torch.Tensor]]:
    """Offsets keyed (β_DPO, lr, steps): every grid setting (``keys`` None) or the ones in ``keys``."""
    out = {}
    for db in cfg.pref_betas:
        for lr in cfg.pref_lrs:
            steps = cfg.pref_steps if keys is None else sorted(st for (d, r, st) in keys if (d, r) == (db, lr))
            if not steps:
                continue
            passes: dict = {}
            snaps, losses = preference_npo(proc, base, pairs, cfg, seed, db, lr, steps, passes)
            out.update({(db, lr, st): v for st, v in snaps.items()})
            if rec is not None:
                name = f"{PREF} β_DPO={db:g} lr={lr:g}"
                rec["train_loss"][name] = [round(float(np.mean(losses[i:i + 10])), 5)
                                           for i in range(0, len(losses), 10)]
                rec["passes"].setdefault(PREF, {}).update({f"{db:g}/{lr:g}/{st}": v for st, v in passes.items()})
    return out


def pref_placebo_seed(cfg: Config, base_seed: int, npo_seed: int, key: tuple) -> int:
    db, lr, st = key
    grid = cfg.pref_betas.index(db) * len(cfg.pref_lrs) + cfg.pref_lrs.index(lr)
    return 1_000_000 + 100_000 * grid + 10_000 * base_seed + 1000 * npo_seed + st


def snap_key(method: str, chosen: dict):
    """Which trained offset a chosen setting names: Self-NPO by its steps, preference by (β_DPO, lr, steps)."""
    if source_of(method) in PREF_METHODS:
        return (chosen["dpo_beta"], chosen["lr"], chosen["steps"])
    return chosen["steps"]


def setting_fields(key) -> dict:
    if isinstance(key, tuple):
        return {"steps": key[2]}
    return {"steps": key}


def pref_fields(key) -> dict:
    return {"dpo_beta": key[0], "lr": key[1]} if isinstance(key, tuple) else {}


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------
class Log:
    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.time()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def summary(deltas: list[float]) -> dict:
    a = np.asarray(deltas, dtype=np.float64)
    n = a.size
    mean = float(a.mean())
    sd = float(a.std(ddof=1)) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
        p = float(stats.ttest_1samp(a, 0.0).pvalue)
    else:
        half, p = float("nan"), float("nan")
    return {"mean": mean, "std": sd, "ci95": [mean - half, mean + half], "p": p, "n": n}


def run(cfg: Config, log: Log) -> dict:
    top = max(cfg.strengths + cfg.extra_strengths)
    methods = [n for m in cfg.variants for n in ([m, f"{m}{EXT}{top:g}"] if cfg.extra_strengths else [m])]
    methods += [PLACEBO] if cfg.placebo else []
    methods += list(PREF_METHODS) if cfg.preference else []
    if PLACEBO in methods and "negative/self" not in cfg.variants:
        raise SystemExit("the placebo takes its norms from the negative/self variant: keep that variant")
    proc = process_of(cfg)
    x, y = load_digits()
    clf, clf_acc = train_classifier(x, y, cfg.feat_dim)
    metric = Metric(clf, x, y)
    log(f"feature classifier: held-out accuracy {clf_acc:.3f}")
    out: dict = {"classifier_heldout_acc": clf_acc, "bases": {}}
    for b in cfg.base_seeds:
        rec: dict = {"val": {}, "chosen": {}, "units": {}, "train_loss": {}, "passes": {}}
        out["bases"][str(b)] = rec
        base = train_base(proc, x, y, cfg, b)
        pn, pl = noise_set(cfg.pool_size, 30_000 + b)
        p0 = passes_now()
        starts = {"data": (x, y), "self": (sample(proc, base, base, pl, cfg.pool_cfg, pn, cfg.sample_steps), pl)}
        rec["sampling_passes"] = {"data": {"forward": 0, "grad": 0}, "self": passes_since(p0)}
        log(f"base {b}: trained, pool sampled")
        pairs = None
        if cfg.preference:
            pairs, rec["pairs"] = self_generated_pairs(proc, base, clf, cfg, 50_000 + b)
            rec["sampling_passes"][PREF] = rec["pairs"]["passes"]
            log(f"base {b}: {rec['pairs']['pairs']} self-generated pairs (log p preferred "
                f"{rec['pairs']['logp_preferred']:.3f}, rejected {rec['pairs']['logp_rejected']:.3f})")

        # ---- validation: tune everything on the same validation noise, Self-NPO seed = npo_seeds[0]
        vn, vl = noise_set(cfg.n_val, 10_000 + b)
        plain_val = {s: metric(sample(proc, base, base, vl, s, vn, cfg.sample_steps), vl) for s in cfg.scales}
        rec["val"]["plain"] = [{"scale": s, **rounded(m)} for s, m in plain_val.items()]
        r0 = cfg.npo_seeds[0]
        snaps0: dict[str, dict] = {}
        for m in [*cfg.variants, *([PLACEBO] if cfg.placebo else []), *(PREF_METHODS if cfg.preference else [])]:
            if m == PLACEBO:
                snaps = {st: placebo_offset(base, snaps0["negative/self"][st], placebo_seed(b, r0, st))
                         for st in cfg.npo_steps}
                grid = [(st, beta) for st in cfg.npo_steps for beta in cfg.strengths]
            elif m == PREF:
                snaps = preference_runs(proc, base, pairs, cfg, r0, None, rec)
                grid = [(key, beta) for key in snaps for beta in cfg.strengths]
            elif m == PREF_PLACEBO:  # the norms of the δ preference chose (per objective), strength and scale tuned
                keys = {snap_key(PREF, min(rec["val"][PREF], key=lambda r, o=obj: r[o])) for obj in cfg.objectives}
                snaps = {key: placebo_offset(base, snaps0[PREF][key], pref_placebo_seed(cfg, b, r0, key))
                         for key in sorted(keys)}
                grid = [(key, beta) for key in snaps for beta in cfg.strengths]
            else:
                passes: dict = {}
                snaps, losses = self_npo(proc, base, *starts[m.split("/")[1]], m, cfg, r0, cfg.npo_steps, passes)
                rec["train_loss"][m] = [round(float(np.mean(losses[i:i + 10])), 5) for i in range(0, len(losses), 10)]
                rec["passes"][m] = {str(st): v for st, v in passes.items()}
                grid = [(st, beta) for st in cfg.npo_steps for beta in cfg.strengths + cfg.extra_strengths]
            snaps0[m] = snaps
            rows = []
            for key, beta in grid:
                neg = with_offset(base, snaps[key], beta)
                for s in cfg.scales:
                    res = plain_val[s] if s == 1.0 else metric(sample(proc, base, neg, vl, s, vn, cfg.sample_steps), vl)
                    rows.append({"scale": s, **setting_fields(key), "beta": beta, **pref_fields(key), **rounded(res)})
            rec["val"][m] = rows
            log(f"base {b}: {m} trained and validated ({len(rows)} settings)")
        for obj in cfg.objectives:
            best = {"plain": min(rec["val"]["plain"], key=lambda r, o=obj: r[o])}
            for m in methods:
                rows = rec["val"][source_of(m)]
                if EXT not in m:
                    rows = [r for r in rows if r["beta"] <= max(cfg.strengths)]
                best[m] = min(rows, key=lambda r, o=obj: r[o])
            rec["chosen"][obj] = {m: {k: r[k] for k in ("scale", "steps", "beta", "dpo_beta", "lr") if k in r}
                                  for m, r in best.items()}

        # ---- test: fresh noise per (base, Self-NPO seed) unit, shared by all methods
        for r in cfg.npo_seeds:
            need: dict[str, set] = {m: set() for m in [*cfg.variants, *([PREF] if cfg.preference else [])]}
            for obj in cfg.objectives:
                for m in methods:
                    c = rec["chosen"][obj][m]
                    need[trained_as(m)].add(snap_key(m, c))
            if r == r0:
                snaps_r = snaps0
            else:
                snaps_r = {m: self_npo(proc, base, *starts[m.split("/")[1]], m, cfg, r, sorted(need[m]))[0]
                           for m in cfg.variants}
                if PLACEBO in methods:
                    snaps_r[PLACEBO] = {st: placebo_offset(base, snaps_r["negative/self"][st], placebo_seed(b, r, st))
                                        for st in need["negative/self"]}
                if cfg.preference:
                    snaps_r[PREF] = preference_runs(proc, base, pairs, cfg, r, need[PREF])
                    snaps_r[PREF_PLACEBO] = {key: placebo_offset(base, snaps_r[PREF][key],
                                                                  pref_placebo_seed(cfg, b, r, key))
                                             for key in need[PREF]}
            tn, tl = noise_set(cfg.n_test, 20_000 + 100 * b + r)
            cache: dict = {}
            unit: dict = {}
            for obj in cfg.objectives:
                unit[obj] = {}
                for m in ["plain", *methods]:
                    c = rec["chosen"][obj][m]
                    if m == "plain" or c["scale"] == 1.0:  # at scale 1 the negative branch has no effect
                        key = ("plain", c["scale"], None, None)
                    else:
                        key = (source_of(m), c["scale"], snap_key(m, c), c["beta"])
                    if key not in cache:
                        if key[0] == "plain":
                            neg = base
                        else:
                            neg = with_offset(base, snaps_r[key[0]][key[2]], c["beta"])
                        cache[key] = rounded(metric(sample(proc, base, neg, tl, c["scale"], tn, cfg.sample_steps), tl))
                    unit[obj][m] = cache[key]
                # plain CFG with its scale picked on this unit's test noise (an optimistic bound for plain CFG:
                # is the Self-NPO gain more than what a finer or luckier choice of the scale would give?)
                c0 = rec["chosen"][obj]["plain"]["scale"]
                cands = [s for s in cfg.scales if abs(s - c0) <= cfg.oracle_window + 1e-9]
                for sc in cands:
                    if ("plain", sc, None, None) not in cache:
                        out_s = sample(proc, base, base, tl, sc, tn, cfg.sample_steps)
                        cache[("plain", sc, None, None)] = rounded(metric(out_s, tl))
                s_best = min(cands, key=lambda sc, o=obj: cache[("plain", sc, None, None)][o])
                unit[obj][ORACLE] = {**cache[("plain", s_best, None, None)], "scale": s_best}
            rec["units"][str(r)] = unit
            log(f"base {b}: test unit (Self-NPO seed {r}) done")

    # ---- paired differences over units
    out["summary"], out["variant_vs_variant"] = {}, {}
    for obj in cfg.objectives:
        per: dict = {}
        for m in ["plain", ORACLE, *methods]:
            vals = {k: [u[obj][m][k] for rec in out["bases"].values() for u in rec["units"].values()]
                    for k in METRICS}
            entry = {k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")}
                     for k, v in vals.items()}
            if m != "plain":
                for k in METRICS:
                    d = [u[obj][m][k] - u[obj]["plain"][k] for rec in out["bases"].values()
                         for u in rec["units"].values()]
                    s = summary(d)
                    better = [v < 0 if k != "acc" else v > 0 for v in d]
                    s["wins"] = int(sum(better))
                    s["rel_mean_pct"] = 100.0 * s["mean"] / entry[k]["mean"] if k != "acc" else None
                    entry[k]["delta"] = s
            per[m] = entry
        out["summary"][obj] = per
        pairs = {}
        todo = [(a, ORACLE) for a in methods] + [(a, PLACEBO) for a in methods if PLACEBO in methods and a != PLACEBO]
        todo += [(a, c) for i, a in enumerate(cfg.variants) for c in cfg.variants[i + 1:]]
        if cfg.preference:
            todo += [(PREF, PREF_PLACEBO)] + [(PREF, c) for c in methods if c not in (PREF, PREF_PLACEBO, PLACEBO)]
        for a, c in todo:
            d = [u[obj][a][obj] - u[obj][c][obj] for rec in out["bases"].values() for u in rec["units"].values()]
            pairs[f"{a} − {c}"] = summary(d)
        out["variant_vs_variant"][obj] = pairs
    out["passes"] = {obj: {m: method_passes(out, m, obj) for m in methods if m not in (PLACEBO, PREF_PLACEBO)}
                     for obj in cfg.objectives}
    return out


def method_passes(out: dict, m: str, obj: str) -> dict:
    """The model passes one offset of ``m`` costs at its chosen setting (mean over base models): sampling its
    start pool or pairs, and training (forward without grad; forward with grad, each followed by a backward)."""
    rows = []
    for rec in out["bases"].values():
        c = rec["chosen"][obj][m]
        src = source_of(m)
        if src == PREF:
            sampling = rec["sampling_passes"][PREF]
            tr = rec["passes"][PREF][f"{c['dpo_beta']:g}/{c['lr']:g}/{c['steps']}"]
        else:
            sampling = rec["sampling_passes"][src.split("/")[1]]
            tr = rec["passes"][src][str(c["steps"])]
        rows.append([sampling["forward"] + sampling["grad"], tr["forward"], tr["grad"]])
    a = np.mean(np.asarray(rows, dtype=np.float64), 0)
    return {"sampling": float(a[0]), "train_forward": float(a[1]), "train_grad": float(a[2]),
            "forward_equivalents": float(a[0] + a[1] + 3 * a[2])}


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_p(p: float) -> str:
    if p != p:
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def markdown(res: dict, cfg: Config) -> str:
    units = len(cfg.base_seeds) * len(cfg.npo_seeds)
    lines = []
    names = {"plain": "plain CFG", PLACEBO: "placebo: random δ, same norms as negative/self",
             ORACLE: "plain CFG, scale picked on the test noise (oracle)",
             PREF: "preference: reversed Diffusion-DPO on self-generated pairs",
             PREF_PLACEBO: "placebo: random δ, same norms as preference"}
    for m in res["summary"][cfg.objectives[0]]:
        if m not in names:
            beyond = EXT in m and max(cfg.extra_strengths) > NODE_STRENGTH_MAX
            names[m] = f"Self-NPO {m}" + (f" (beyond the node's 0–{NODE_STRENGTH_MAX:g})" if beyond else "")
    for obj in cfg.objectives:
        lines += [f"**Tuned for {METRICS[obj]}** (validation), test: mean ± std over {units} units "
                  f"({len(cfg.base_seeds)} base models × {len(cfg.npo_seeds)} Self-NPO seeds, "
                  f"{cfg.n_test} samples each); Δ = method − plain CFG on the same test noise, 95 % t-interval, "
                  f"two-sided paired t-test p, wins = units where the method is better.", "",
                  f"| method | tuned scale / steps / β (per base seed) | class-cond. FD ↓ | FD ↓ | accuracy ↑ "
                  f"| Δ {METRICS[obj][:-2]} (95 % CI), relative | p | wins |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, e in res["summary"][obj].items():
            chosen = []
            for rec in res["bases"].values():
                if m == ORACLE:
                    chosen.append("/".join(f"{u[obj][ORACLE]['scale']:g}" for u in rec["units"].values()))
                    continue
                c = rec["chosen"][obj][m]
                chosen.append(f"{c['scale']:g}" + (f" / {c['steps']} / {c['beta']:g}" if "steps" in c else "")
                              + (f" / β_DPO {c['dpo_beta']:g} / lr {c['lr']:g}" if "dpo_beta" in c else ""))
            cells = [f"{e[k]['mean']:.2f} ± {e[k]['std']:.2f}" if k != "acc" else
                     f"{100 * e[k]['mean']:.2f} % ± {100 * e[k]['std']:.2f}" for k in METRICS]
            if "delta" in e[obj]:
                d = e[obj]["delta"]
                lo, hi = d["ci95"]
                ci = f" ({lo:+.2f} … {hi:+.2f})" if lo == lo else ""
                dcell = f"{d['mean']:+.2f}{ci}, {d['rel_mean_pct']:+.1f} %"
                tail = [dcell, fmt_p(d["p"]), f"{d['wins']}/{d['n']}"]
            else:
                tail = ["–", "–", "–"]
            lines.append(f"| {names[m]} | {'; '.join(chosen)} | " + " | ".join(cells + tail) + " |")
        lines += ["", f"Paired differences in {METRICS[obj]} between methods (row − column's method, "
                  "negative = the first is better):", "", "| pair | Δ mean (95 % CI) | p | n |", "|---|---|---|---|"]
        for pair, d in res["variant_vs_variant"][obj].items():
            if pair.endswith(PLACEBO):  # the placebo is no better than plain CFG: these pairs are in the JSON
                continue
            lo, hi = d["ci95"]
            ci = f" ({lo:+.2f} … {hi:+.2f})" if lo == lo else ""
            lines.append(f"| {pair.replace(ORACLE, 'plain CFG (oracle scale)')} | {d['mean']:+.2f}{ci} "
                         f"| {fmt_p(d['p'])} | {d['n']} |")
        lines.append("")
    # validation curves: mean over base seeds, each method at its chosen (steps, β) for the first objective
    obj = cfg.objectives[0]
    lines += [f"Validation {METRICS[obj]} by CFG scale (mean over base models; Self-NPO at the steps/β chosen "
              f"for {METRICS[obj]}):", "",
              "| method | " + " | ".join(f"s={s:g}" for s in cfg.scales) + " |",
              "|---|" + "---|" * len(cfg.scales)]
    for m in res["summary"][obj]:
        if m == ORACLE:
            continue
        row = []
        for s in cfg.scales:
            vals = []
            for rec in res["bases"].values():
                c = rec["chosen"][obj][m]
                vals += [r[obj] for r in rec["val"][source_of(m)]
                         if r["scale"] == s and all(r.get(k) == c.get(k) for k in ("steps", "beta", "dpo_beta", "lr"))]
            row.append(f"{np.mean(vals):.2f}")
        lines.append(f"| {names[m]} | " + " | ".join(row) + " |")
    if any(PREF in rec["passes"] for rec in res["bases"].values()):
        lines += ["", "Model passes of one offset at its chosen setting (network evaluations of one 8×8 image; mean "
                  "over base models; sampling = the start pool or the pairs, 20 steps, cond + uncond; "
                  "forward-equivalents count a backward as 2 forwards):", ""]
        for o in cfg.objectives:
            lines += [f"| tuned for {METRICS[o]} | sampling | training, forward | training, forward + backward "
                      "| forward-equivalents |", "|---|---|---|---|---|"]
            for m, v in res["passes"][o].items():
                lines.append(f"| {names.get(m, m)} | {v['sampling']:,.0f} | {v['train_forward']:,.0f} "
                             f"| {v['train_grad']:,.0f} | {v['forward_equivalents']:,.0f} |")
            lines.append("")
        for bseed, rec in res["bases"].items():
            pr = rec["pairs"]
            lines.append(f"Pairs, base {bseed}: {pr['pairs']} from {pr['samples']} samples; log p(class): preferred "
                         f"{pr['logp_preferred']:.3f}, rejected {pr['logp_rejected']:.3f}; classified right: all "
                         f"{100 * pr['acc_all']:.1f} %, preferred {100 * pr['acc_preferred']:.1f} %, rejected "
                         f"{100 * pr['acc_rejected']:.1f} %.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: one base model, tiny settings (~1 min)")
    ap.add_argument("--base", choices=["vp", "flow"], default="vp",
                    help="the base model: vp (eps, SD's discrete schedule; default) or flow (rectified flow, v, "
                         "shift 3 as SD3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--methods", default=",".join([*VARIANTS, PLACEBO, PREF]),
                    help=f"comma-separated, from {', '.join([*VARIANTS, PLACEBO, PREF])} (default: all; "
                         f"'{PREF}' brings its own placebo; '{PLACEBO}' needs negative/self)")
    ap.add_argument("--json", type=Path, help="write the full results (validation curves, units, summary) here")
    ap.add_argument("--md", type=Path, help="write the Markdown tables here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = quick_config(args.base) if args.quick else full_config(args.base)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in (*VARIANTS, PLACEBO, PREF)]
    if bad or not chosen:
        ap.error(f"--methods: unknown {bad}; choose from {', '.join([*VARIANTS, PLACEBO, PREF])}")
    cfg.variants = [v for v in VARIANTS if v in chosen]
    cfg.placebo, cfg.preference = PLACEBO in chosen, PREF in chosen
    log = Log(args.quiet)
    res = run(cfg, log)
    wall = time.time() - log.t0
    res["config"] = asdict(cfg)
    res["runtime_s"] = round(wall, 1)
    res["environment"] = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                          "machine": platform.machine(), "threads": args.threads, "quick": args.quick}
    md = markdown(res, cfg) + f"\nWall time: {wall / 60:.1f} min ({args.threads} thread(s)).\n"
    print(md)
    for path, text in ((args.md, md), (args.json, json.dumps(res, indent=1))):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


if __name__ == "__main__":
    main()
