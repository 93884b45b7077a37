"""Steering methods. Each is a small object whose `run(request)` returns a `SteerResult`; all sample through
`visalign.sampling.transition` (the same step the samplers and trainers use), so they work for every adapter.

- `BestOfN`: n independent samples per prompt, keep the best by reward (the baseline at equal NFE).
- `FKSteering`: k particles per prompt on a flow SDE, FK potentials on the decoded x0-prediction, log-space
  weights, resampling within each prompt's particles on a schedule or when ESS falls below a threshold.
- `RewardGuidance`: the velocity after CFG minus scale × the reward gradient through the x0-prediction
  (DPS / Flow-NRG style), normalised per sample, inside a start/stop window.
- `ReNO`: optimise the initial noise against differentiable rewards with the noise-norm regulariser, keep the
  best iterate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpointed

from visalign.sampling import SDEOptions, sample
from visalign.sampling.sampler import draw_noise, sample_generators, transition
from visalign.steering.core import Potentials, Request, SteerResult, steer_result
from visalign.steering.drift import RewardDrift
from visalign.steering.resampling import effective_sample_size, normalize_log_weights, resample


def _pick(values: Tensor, n: int) -> Tensor:
    """Index of the best of each prompt's n consecutive samples, as flat indices."""
    best = values.view(-1, n).argmax(1)
    return best + torch.arange(len(best), device=best.device) * n


@dataclass
class BestOfN:
    """n samples per prompt (ODE, or an SDE when `sde` is given), keep the one with the highest total reward."""

    n: int = 4
    sde: str = "ode"
    noise_level: float = 0.7

    def run(self, request: Request) -> SteerResult:
        if self.n < 1:
            raise ValueError(f"best-of-N: n={self.n} must be >= 1")

        cond = request.cond.repeat_interleave(self.n)
        traj = sample(request.adapter, cond, num_steps=request.steps, height=request.height, width=request.width,
                      num_frames=request.num_frames, guidance_scale=request.guidance,
                      sde=SDEOptions(self.sde, self.noise_level), seeds=request.seeds(self.n))
        total, _ = request.score(traj.final, repeat=self.n)
        best = _pick(total, self.n)
        return steer_result(request, traj.final[best], {"method": "best_of_n", "n": self.n,
                                                        "candidate_rewards": total.view(-1, self.n).tolist()})


@dataclass
class FKSteering:
    """Feynman-Kac steering (Singhal et al. 2025, Algorithm 1) for flow models.

    Particles follow a flow SDE (`sde`, `noise_level`; an ODE would leave resampled copies identical, FK #7).
    At each resampling step the intermediate reward is the total reward of the decoded x0-prediction of the step's
    input (as the reference code does), potentials accumulate in log space, and when the schedule says so (every
    `every` steps in [start, end), plus the final step) and ESS < `ess_threshold` × k (None: always), each
    prompt's particles are resampled by `scheme`; every per-particle state follows its ancestor. The final step
    applies the correction so each lineage's product of potentials is exp(lambda r(x0)), then resamples.
    `select`: "best" returns each prompt's highest-reward final particle (the reference code's output),
    "weighted" one particle drawn by the final weights (a sample from the tilted distribution).

    Potentials: the default, "diff" (lambda (r_t - r_prev)), makes every intermediate target p_t · exp(lambda r_t)
    and converges to the exp(lambda r)-tilted distribution as k grows (on the closed-form 1-D Gaussian case with
    k=256: mean 1.04 and variance 0.96 against 1 and 1). "max", "sum" and "rt" (the reference's default is "max")
    trade exactness for reward: resampled every step they push particles far past the target before the final
    correction can undo it (same case: mean 4.6, 6.2, 4.6 against 1; "max" every 5 steps: 1.4). Use them, with
    select="best", when only the reward matters.

    `proposal_scale` > 0 turns on a gradient-guided proposal (TDS / DAS style): on stochastic steps the mean
    moves by proposal_scale × std² × lambda × grad r(decode(x0-prediction)) (the twist's gradient, with the
    velocity held constant), and the weights get the importance correction log p(x'|x) - log q(x'|x) of the
    base and shifted Gaussians (summed over dimensions), so the target stays exp(lambda r)-tilted. It needs
    differentiable rewards."""

    k: int = 4
    potential: str = "diff"
    lam: float = 10.0
    every: int = 1
    start: int = 0
    end: int | None = None
    ess_threshold: float | None = None
    scheme: str = "systematic"
    sde: str = "flow_grpo"
    noise_level: float = 0.7
    select: str = "best"
    proposal_scale: float = 0.0
    keep_x0: bool = False  # report the decoded x0-predictions of every resampling step (for the demo's FK view)

    def schedule(self, steps: int) -> list[int]:
        end = steps if self.end is None else min(self.end, steps)
        return sorted({*range(self.start, end, max(1, self.every)), steps - 1})

    def _guided_proposal(self, request: Request, step, noise: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Shifted proposal and its log importance correction (see FKSteering)."""
        with torch.enable_grad():
            x0 = step.x0_pred.detach().requires_grad_(True)
            total, _ = request.score(x0, repeat=k, grad=True)
            (grad,) = torch.autograd.grad(total.sum(), x0)
        request.stats["backward_passes"] += len(x0)

        shift = RewardDrift(scale=self.proposal_scale * self.lam).shift(grad, step.std)  # the tilted proposal
        std = step.std.view(-1, *([1] * (x0.ndim - 1)))
        x_next = step.mean + shift + std * noise
        dims = tuple(range(1, x0.ndim))
        safe = std.clamp(min=1e-12).pow(2)
        log_p = -((x_next - step.mean).pow(2) / (2 * safe)).sum(dims)
        log_q = -((x_next - step.mean - shift).pow(2) / (2 * safe)).sum(dims)
        return x_next.detach(), (log_p - log_q).double().cpu()

    def run(self, request: Request) -> SteerResult:
        if self.k < 1 or self.select not in ("best", "weighted"):
            raise ValueError(f"FK: k={self.k} must be >= 1 and select in ('best', 'weighted'), got {self.select!r}")
        adapter, k, prompts = request.adapter, self.k, len(request.prompts)
        n = prompts * k
        sigmas = adapter.sigmas(request.steps, request.shape)
        sde = SDEOptions(self.sde, self.noise_level)
        stochastic = sde.stochastic_steps(sigmas)
        gens = sample_generators(request.seeds(k))
        x = draw_noise(request.shape, n, gens, device=adapter.device)
        cond = request.cond.repeat_interleave(k)
        potentials = Potentials(self.potential, self.lam, n)
        log_w = torch.zeros(prompts, k, dtype=torch.float64)
        resample_at = set(self.schedule(request.steps))
        rng = torch.Generator().manual_seed(request.seed * 7919 + 13)
        lineage, ess_log, x0_images = [], [], []
        for i in range(request.steps):
            noise = draw_noise(request.shape, n, gens, device=adapter.device) if stochastic[i] else None
            guided = self.proposal_scale > 0 and noise is not None
            with torch.no_grad():
                step = transition(adapter, x, sigmas[i], sigmas[i + 1], cond, request.guidance, sde, sigmas[1],
                                  stochastic=bool(stochastic[i]), noise=None if guided else noise)
            x = step.x_next
            if guided:
                x, log_correction = self._guided_proposal(request, step, noise, k)
                log_w = log_w + log_correction.view(prompts, k)
            if i not in resample_at:
                continue
            final = i == request.steps - 1
            images = request.decode(x if final else step.x0_pred)
            r, _ = request.score_images(images, repeat=k)
            if self.keep_x0:
                x0_images.append((i, images.view(prompts, k, *images.shape[1:])[0].cpu()))
            final_r = r
            log_w = log_w + potentials.log_potential(r.cpu(), final).view(prompts, k)
            ess = effective_sample_size(log_w)
            ess_log.append({"step": i, "ess": ess.tolist()})
            threshold = self.ess_threshold
            if final or threshold is None or bool((ess < threshold * k).any()):
                idx = resample(log_w, self.scheme, rng)
                x = x[idx.to(x.device)]
                potentials.permute(idx)
                # Noise streams stay with their slots: copies of one ancestor must draw different noise next.
                lineage.append({"step": i, "ancestors": idx.view(prompts, k).tolist()})
                log_w = torch.zeros_like(log_w)  # equal weights after resampling (-log k, up to a constant)
                final_r = final_r[idx.to(final_r.device)]
        total = final_r  # the final step is always scored (and resampled): its rewards, in the particles' order
        if self.select == "best":
            chosen = _pick(total, k)
        else:  # after the final resampling the particles are equally weighted: a uniformly chosen one is a draw
            # (not slot 0: systematic resampling orders copies by ancestor, so a fixed slot would be biased)
            chosen = torch.arange(prompts) * k + torch.randint(k, (prompts,), generator=rng)
        final_log_w = normalize_log_weights(log_w)
        return steer_result(request, x[chosen], {"method": "fk", "k": k, "potential": self.potential, "lam": self.lam,
                                                 "lineage": lineage, "ess": ess_log,
                                                 "particle_rewards": total.view(prompts, k).tolist(),
                                                 "final_log_weights": final_log_w.tolist(),
                                                 **({"x0_images": x0_images} if self.keep_x0 else {})})


@dataclass
class RewardGuidance:
    """Reward-gradient guidance on the velocity after CFG (Flow-NRG's recipe per VideoAlign #17: CFG first, then
    the reward gradient; DPS-style through the x0-prediction x0 = x - sigma v):

        v' = v_cfg - scale * g / ||g||,   g = grad_x r(decode(x - sigma v))   (per-sample normalised),

    on steps [start, stop). `through_model=False` treats v as constant in the gradient (one backward through
    the decoder and reward only); True backpropagates through the denoiser as DPS does. The Euler step
    x + (sigma' - sigma) v' moves x up the reward, since sigma' < sigma."""

    scale: float = 1.0
    start: int = 0
    stop: int | None = None
    normalize: bool = True
    through_model: bool = False

    def run(self, request: Request) -> SteerResult:
        adapter = request.adapter
        sigmas = adapter.sigmas(request.steps, request.shape)
        gens = sample_generators(request.seeds(1))
        x = draw_noise(request.shape, len(request.prompts), gens, device=adapter.device)
        stop = request.steps if self.stop is None else self.stop
        norms = []
        for i in range(request.steps):
            sigma = sigmas[i].to(x.device)
            if self.start <= i < stop and self.scale != 0:
                with torch.enable_grad():
                    xg = x.detach().requires_grad_(True)
                    v = adapter.predict_velocity(xg if self.through_model else x, sigma.expand(len(x)), request.cond,
                                                 request.guidance)
                    x0 = xg - sigma * (v if self.through_model else v.detach())
                    total, _ = request.score(x0, grad=True)
                    (g,) = torch.autograd.grad(total.sum(), xg)
                request.stats["backward_passes"] += len(x)
                g = g.detach()
                dims = tuple(range(1, g.ndim))
                norm = g.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, *([1] * len(dims)))
                norms.append(norm.flatten().tolist())
                v = v.detach() - self.scale * (g / norm if self.normalize else g)
            else:
                with torch.no_grad():
                    v = adapter.predict_velocity(x, sigma.expand(len(x)), request.cond, request.guidance)
            x = (x + (sigmas[i + 1] - sigmas[i]).to(x.device) * v).detach()
        return steer_result(request, x, {"method": "guidance", "scale": self.scale, "window": [self.start, stop],
                                         "gradient_norms": norms})


@dataclass
class ReNO:
    """Reward-based noise optimisation (Eyring et al. 2024; ExplainableML/ReNO `training/trainer.py`): gradient
    ascent on the initial noise z through the whole ODE sampler,

        L(z) = -sum_k w_k r_k(decode(G(z))) + reg * (||z||²/2 - (d - 1) log ||z||)   (chi-norm log-likelihood),

    SGD with Nesterov momentum, each sample's gradient norm clipped (ReNO optimises one image at a time, so
    per-sample clipping keeps chunking exact), `iterations` steps; returns the iterate with the highest reward
    (regulariser excluded), as ReNO does. Memory is bounded by optimising `chunk` prompts at a time and by
    recomputing each denoising step in the backward pass (activation checkpointing)."""

    iterations: int = 10
    lr: float = 5.0
    momentum: float = 0.9
    reg: float = 0.01
    grad_clip: float = 0.1
    chunk: int = 8
    checkpoint: bool = True

    def run(self, request: Request) -> SteerResult:
        if self.chunk < 1 or self.iterations < 0:
            raise ValueError(f"ReNO: chunk={self.chunk} must be >= 1 and iterations={self.iterations} >= 0")
        adapter = request.adapter
        sigmas = adapter.sigmas(request.steps, request.shape)
        gens = sample_generators(request.seeds(1))
        z_all = draw_noise(request.shape, len(request.prompts), gens, device=adapter.device)
        best_x, history = [], []
        for start in range(0, len(request.prompts), self.chunk):
            sl = slice(start, start + self.chunk)
            x, h = self._optimise(request, z_all[sl].clone(), request.cond.index(sl), sl, sigmas)
            best_x.append(x)
            history.append(h)
        rewards = torch.cat([torch.tensor(h) for h in history], dim=1)  # [iterations + 1, prompts]
        return steer_result(request, torch.cat(best_x), {"method": "reno", "iterations": self.iterations,
                                                         "reward_history": rewards.tolist()})

    def _optimise(self, request: Request, z: Tensor, cond, sl: slice, sigmas: Tensor):
        adapter = request.adapter
        sub = Request(adapter, request.prompts[sl], cond, request.rewards, request.steps, request.guidance,
                      request.height, request.width, request.num_frames, request.seed,
                      None if request.metadata is None else request.metadata[sl], request.stats)
        z.requires_grad_(True)
        opt = torch.optim.SGD([z], lr=self.lr, momentum=self.momentum, nesterov=True)
        d = math.prod(request.shape)

        def euler(x, i):
            v = adapter.predict_velocity(x, sigmas[i].to(x.device).expand(len(x)), cond, request.guidance)
            return x + (sigmas[i + 1] - sigmas[i]).to(x.device) * v

        best_r = torch.full((len(z),), -math.inf)
        best_x, history = None, []
        for it in range(self.iterations + 1):
            with torch.enable_grad():
                x = z
                for i in range(request.steps):
                    x = checkpointed(euler, x, i, use_reentrant=False) if self.checkpoint else euler(x, i)
                total, _ = sub.score(x, grad=True)
            r = total.detach().cpu()
            better = (r > best_r).to(x.device).view(-1, *([1] * (x.ndim - 1)))
            best_x = x.detach().clone() if best_x is None else torch.where(better, x.detach(), best_x)
            best_r = torch.maximum(best_r, r)
            history.append(r.tolist())
            if it == self.iterations:
                break
            norm = z.flatten(1).norm(dim=1)
            loss = -total.sum() + self.reg * (0.5 * norm.pow(2) - (d - 1) * torch.log(norm)).sum()
            opt.zero_grad()
            loss.backward()
            request.stats["backward_passes"] += len(z) * request.steps
            with torch.no_grad():  # per-sample gradient-norm clipping
                g_norm = z.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
                z.grad.mul_((self.grad_clip / g_norm).clamp(max=1.0).view(-1, *([1] * (z.ndim - 1))))
            opt.step()
        return best_x, history
