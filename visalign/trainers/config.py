"""The sections of a training config and their checks, shared by every recipe: `model`, `sampling`, `run`, the
`train` fields every recipe has (`BaseTrainConfig`), and `RecipeConfig`, which a recipe's config subclasses.
Everything is validated when the config loads, before any model does."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from visalign import rewards as rewards_lib
from visalign.config import check_ranges
from visalign.models import check_model_options, request_rules, resolve_model_path
from visalign.prompts import check_prompt_spec
from visalign.rewards.registry import FRAMES_PREFIX, SERVICES, composite_parts
from visalign.suggest import did_you_mean
from visalign.trainers.balance.balancer import SAFE, check_weights
from visalign.trainers.diagnostics import DRIFT_METRICS, ROLLOUT_DRIFT


@dataclass
class ModelConfig:
    name: str = field(default="world", metadata={"help": "registered model (world, sd3, flux, wan, tiny-*)"})
    path: str | None = field(default=None, metadata={"help": "local directory or hub id (world: checkpoint)"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "weights"})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the adapter's options (`visalign models` lists them), e.g. {max_sequence_length: 256}, Wan2.2 "
                "A14B's {experts: low, guidance_scale_2: 3}"})
    height: int = field(default=32, metadata={"ge": 1, "help": "image height"})
    width: int = field(default=32, metadata={"ge": 1, "help": "image width"})
    num_frames: int | None = field(default=None, metadata={"ge": 1, "help": "video models: 4k+1 frames"})
    finetune: Literal["lora", "full"] = field(default="lora", metadata={"help": "LoRA adapter or all weights"})
    lora_rank: int = field(default=32, metadata={"ge": 1, "help": "LoRA rank (flow_grpo: 32)"})
    lora_alpha: float | None = field(default=None, metadata={"gt": 0, "help": "LoRA alpha (default 2 × rank)"})
    lora_targets: list[str] | None = field(default=None, metadata={"help": "module names (default per model)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    reference_dtype: Literal["same", "bfloat16", "float16"] = field(default="same", metadata={
        "help": "full fine-tuning: the frozen reference copy's dtype (KL / DPO reference); half precision halves "
                "its memory, its pass runs under autocast"})
    offload_copies: bool = field(default=False, metadata={
        "help": "keep the frozen reference copy, the old-policy / reference parameter copies and the EMA in CPU "
                "memory, moved to the accelerator for each use (single-process or DDP runs)"})
    free_text_encoders: bool = field(default=False, metadata={
        "help": "encode every prompt of the run once at start, then free the text encoders (prompt files only, "
                "not a generated source such as world:seen)"})

    def __post_init__(self):
        if self.reference_dtype != "same" and self.finetune != "full":
            raise ValueError(f"reference_dtype={self.reference_dtype!r} sets the dtype of full fine-tuning's frozen "
                             "reference copy; with finetune='lora' the reference is the base weights with the "
                             "adapter switched off (set model.finetune=full, or leave reference_dtype='same')")


@dataclass
class DriftConfig:
    """`sampling.drift`: Euphonium's reward-gradient drift on the SDE steps of rollouts."""

    scale: float = field(default=0.0, metadata={"ge": 0, "help": "drift strength (0 = off)"})
    mode: Literal["tilt", "fixed"] = field(default="tilt", metadata={
        "help": "tilt: shift = scale * std^2 * grad r; fixed: shift = scale * grad r"})
    normalize: Literal["none", "sample", "batch"] = field(default="none", metadata={
        "help": "normalise the reward gradient per sample or by the batch norm (Euphonium)"})
    window: tuple[int, int] | None = field(default=None, metadata={
        "help": "[start, stop) steps with drift (default: every SDE step)"})
    rewards: dict[str, float] | None = field(default=None, metadata={
        "help": "differentiable rewards and weights for the drift (default: the trained rewards)"})

    def __post_init__(self):
        if self.window is not None and not 0 <= self.window[0] < self.window[1]:
            raise ValueError(f"window={self.window} must satisfy 0 <= start < stop")


@dataclass
class SamplingConfig:
    MOVED: ClassVar[dict[str, str]] = {"drift_scale": "drift.scale", "drift_mode": "drift.mode",
                                       "drift_normalize": "drift.normalize", "drift_window": "drift.window",
                                       "drift_rewards": "drift.rewards"}


    steps: int = field(default=10, metadata={"ge": 2, "help": "denoising steps in rollouts (flow_grpo: 10)"})
    guidance: float = field(default=4.5, metadata={"ge": 0, "help": "CFG scale for rollouts and training (1 = no CFG)"})
    sde: Literal["flow_grpo", "cps", "dance", "ode"] = field(default="flow_grpo", metadata={
        "help": "rollout sampler: an SDE (flow_grpo, cps, dance) or ode (NFT, RWR, DPO need no log-probs)"})
    noise_level: float = field(default=0.7, metadata={"ge": 0, "help": "a (flow_grpo, cps) or eta (dance)"})
    window_size: int | None = field(default=None, metadata={"ge": 1, "help": "SDE only on this many consecutive steps"})
    decode_batch: int | None = field(default=None, metadata={
        "ge": 1, "help": "decode rollout and evaluation latents this many at a time (the VAE's activations); "
                         "default: a whole batch"})
    window_range: tuple[int, int] | None = field(default=None, metadata={
        "help": "[lo, hi): the window lies inside; its start is drawn each step (Flow-GRPO-Fast)"})
    same_noise_per_group: bool = field(default=False, metadata={"help": "DanceGRPO: a group shares x_T"})
    noise_block: int = field(default=1, metadata={"ge": 1,
        "help": "SDE noise constant on noise_block × noise_block latent tiles (coarse-subspace SDE, fewer noise "
                "dimensions for the policy gradient; 1 = isotropic; visalign.sampling.SDEOptions)"})
    batch_size: int = field(default=16, metadata={"ge": 1, "help": "samples per sampling batch (per process)"})
    drift: DriftConfig = field(default_factory=DriftConfig, metadata={
        "help": "Euphonium reward-gradient drift on the SDE steps of rollouts (visalign.steering.RewardDrift)"})

    def __post_init__(self):
        if self.drift.scale > 0 and self.sde == "ode":
            raise ValueError("drift.scale > 0 needs an SDE sampler (sampling.sde); an ODE step has no noise to steer")
        if self.window_size is not None:
            lo, hi = self.window_range or (0, self.steps - 1)
            if not (1 <= self.window_size <= hi - lo and 0 <= lo < hi <= self.steps):
                raise ValueError(f"window_size={self.window_size} must fit in window_range=[{lo}, {hi}) "
                                 f"within {self.steps} steps")
        elif self.window_range is not None:
            raise ValueError("window_range needs window_size")


@dataclass
class AlarmConfig:
    """`run.alarm`: the reward-hacking alarm and the drift watch, checked at every evaluation."""

    tolerance: float | None = field(default=None, metadata={"ge": 0,
        "help": "fire when a held-out signal (eval_rewards, rollout diversity) falls by more than this since the "
                "first evaluation while the trained reward rises (None = off)"})
    rise: float = field(default=0.0, metadata={"ge": 0, "help": "minimum rise of the trained reward"})
    window: int = field(default=1, metadata={"ge": 1, "help": "moving average over this many evaluations"})
    watch: dict[str, float] = field(default_factory=dict, metadata={
        "help": "drift diagnostics and limits, e.g. {drift/brightness: 0.1}: fire when one, averaged over the steps "
                "since the previous evaluation, moves by more than its limit from its value at the first "
                "evaluation (either direction; visalign.trainers.diagnostics lists them)"})
    action: Literal["log", "stop", "rollback"] = field(default="log", metadata={
        "help": "log it; also stop; or stop and restore the saved checkpoint whose evaluation had the best value "
                "of the signal that fell or drifted (keep checkpoint_every = eval_every and enough checkpoints)"})

    def __post_init__(self):
        for name, limit in self.watch.items():
            if name not in DRIFT_METRICS:
                raise ValueError(f"run.alarm.watch: unknown metric {name!r}{did_you_mean(name, DRIFT_METRICS)}; "
                                 f"allowed: {', '.join(DRIFT_METRICS)}")
            if not limit > 0 or not math.isfinite(limit):
                raise ValueError(f"run.alarm.watch.{name}={limit}: the limit must be a finite number > 0")


@dataclass
class RunConfig:
    MOVED: ClassVar[dict[str, str]] = {"alarm_tolerance": "alarm.tolerance", "alarm_rise": "alarm.rise",
                                       "alarm_window": "alarm.window", "alarm_action": "alarm.action"}


    out_dir: str = field(default="runs/flow_grpo", metadata={"help": "checkpoints, logs, samples"})
    seed: int = field(default=0, metadata={"ge": 0, "help": "seeds prompts, noise and shuffles"})
    checkpoint_every: int = field(default=50, metadata={"ge": 1, "help": "steps between checkpoints"})
    checkpoints_total_limit: int | None = field(default=2, metadata={"ge": 1, "help": "keep this many checkpoints"})
    resume_from: str | None = field(default="latest", metadata={"help": "latest, a checkpoint dir, or null"})
    log_with: Literal["tensorboard", "wandb", "none"] = field(default="tensorboard", metadata={"help": "tracker"})
    eval_every: int = field(default=25, metadata={"ge": 0, "help": "steps between evaluations (0 = never)"})
    eval_prompts: str | None = field(default=None, metadata={"help": "prompt source for evaluation (default: "
                                                                    "the training source)"})
    eval_num_prompts: int = field(default=32, metadata={"ge": 1, "help": "evaluation prompts (fixed seeds)"})
    eval_steps: int = field(default=20, metadata={"ge": 1, "help": "ODE steps for evaluation samples"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    skip_limit: int = field(default=3, metadata={"ge": 1, "help": "steps skipped in a row (every reward invalid, "
                                                  "or a non-finite loss or gradient) before the run stops"})
    alarm: AlarmConfig = field(default_factory=AlarmConfig, metadata={
        "help": "the reward-hacking alarm (visalign.trainers.alarms)"})

    def __post_init__(self):
        if (self.alarm.tolerance is not None or self.alarm.watch) and self.eval_every < 1:
            raise ValueError("run.alarm.tolerance and run.alarm.watch need evaluations: set run.eval_every >= 1")


@dataclass
class AdvantageConfig:
    """`train.advantage`: how a step's rewards become one advantage per sample, and which samples train
    (`visalign.trainers.weighting.AdvantageWeighting`)."""

    mode: Literal["sum_then_normalize", "normalize_then_sum", "cmo", "hypervolume"] = field(
        default="sum_then_normalize", metadata={
            "help": "multi-reward in advantage space: weighted sum of rewards, of per-reward advantages (GDPO), "
                    "CMO correlation weights, or hypervolume-guided dynamic weights "
                    "(visalign.trainers.balance.advantages)"})
    clip: float = field(default=5.0, metadata={"gt": 0, "help": "advantage clamp"})
    eps: float = field(default=1e-4, metadata={"ge": 0, "help": "epsilon added to the std"})
    global_std: bool = field(default=False, metadata={"help": "normalise by the batch std instead of the group's"})
    cmo_tau: float = field(default=0.5, metadata={"gt": 0, "help": "CMO softmax temperature"})
    hypervolume_reference: dict[str, float] | None = field(default=None, metadata={
        "help": "hypervolume reference point per reward (default: each reward's lower value bound)"})
    pareto_filter: bool = field(default=False, metadata={
        "help": "Parrot: train only on the batch's Pareto-optimal samples (non-dominated on the trained rewards)"})
    best_of_n: int | None = field(default=None, metadata={"ge": 2,
        "help": "train only on the n/2 best and n/2 worst samples of each group (DanceGRPO)"})
    constraints: dict[str, float] | None = field(default=None, metadata={
        "help": "constrained RLHF: {reward: minimum mean}; maximise the other trained reward(s) subject to these, "
                "with Lagrange multipliers updated by dual ascent"})
    constraint_lr: float = field(default=0.1, metadata={"gt": 0,
        "help": "dual-ascent step of the Lagrange multipliers"})

    def __post_init__(self):
        if self.best_of_n is not None and (self.best_of_n < 2 or self.best_of_n % 2):
            raise ValueError(f"best_of_n={self.best_of_n} must be even and >= 2")
        if self.constraints and self.mode != "sum_then_normalize":
            raise ValueError("constraints form their own objective; they exclude mode="
                             f"{self.mode!r} (keep sum_then_normalize)")


@dataclass
class BalanceConfig:
    """`train.balance`: multi-reward balancing in gradient space (`visalign.trainers.balance`): one gradient per
    reward, combined by an aggregator; MARBLE's amortised form takes one backward of blended weights."""

    method: Literal["none", "sum", "mgda", "pcgrad", "cagrad", "upgrad"] = field(default="none", metadata={
        "help": "the aggregator of the per-reward gradients (none = the weighted rewards' single gradient)"})
    ema: float = field(default=0.0, metadata={"ge": 0, "lt": 1,
        "help": "EMA decay of the aggregator's coefficients (MARBLE)"})
    normalize: bool = field(default=False, metadata={
        "help": "per-reward gradients to unit norm first; the reward weights then become a preference among them "
                "(sum, upgrad; mgda / pcgrad / cagrad need equal weights)"})
    track: float = field(default=0.0, metadata={"ge": 0, "lt": 1,
        "help": "decay of per-reward gradients tracked across refreshes; > 0 takes the coefficients from their "
                "Gram matrix (MoCo) instead of the step's alone (explicit Gram, gram=params; 0 = off)"})
    safeguard: bool = field(default=False, metadata={
        "help": "mgda / upgrad: when the EMA-smoothed coefficients would point the update against a reward's "
                "gradient (on the refresh's Gram matrix), use the refresh's own coefficients instead"})
    amortized: bool = field(default=False, metadata={
        "help": "one backward with blended reward weights (MARBLE; losses affine in the weight); the Gram matrix "
                "is refreshed on the first refresh_batches micro-batches every `every` steps"})
    gram: Literal["params", "output"] = field(default="params", metadata={
        "help": "amortised form: Gram matrix of the per-reward gradients of the parameters (explicit backwards on "
                "refresh_batches micro-batches) or of the predicted velocity over every micro-batch of the step "
                "(MGDA-UB: backward through the loss only), whose coefficients then apply to the next step"})
    every: int = field(default=1, metadata={"ge": 1, "help": "steps between Gram refreshes (amortised form)"})
    refresh_batches: int = field(default=1, metadata={"ge": 1,
        "help": "amortised form: micro-batches whose per-reward gradients estimate the Gram matrix at a refresh"})
    cagrad_c: float = field(default=0.4, metadata={"ge": 0, "help": "CAGrad's c"})

    def __post_init__(self):
        off = self.method == "none"
        if self.track > 0 and (off or self.gram == "output"):
            raise ValueError("track tracks the per-reward parameter gradients: it needs a method and gram=params")
        if self.amortized and off:
            raise ValueError("amortized needs a method (e.g. mgda)")
        if self.gram == "output" and not self.amortized:
            raise ValueError("gram=output is a form of the amortised update: set amortized=true")
        if self.gram == "output" and (self.every != 1 or self.refresh_batches != 1):
            raise ValueError("every and refresh_batches choose the explicit refreshes of gram=params; gram=output "
                             "refreshes from every micro-batch of every step")
        if self.safeguard and self.method not in SAFE:
            raise ValueError(f"safeguard needs method in {SAFE} (an update that never conflicts), not "
                             f"{self.method!r}")

    @property
    def on(self) -> bool:
        return self.method != "none"


@dataclass
class EMAConfig:
    """`train.ema`: an exponential moving average of the trained weights, used for evaluation and saved."""

    decay: float | None = field(default=None, metadata={"ge": 0, "lt": 1,
        "help": "EMA decay (flow_grpo: 0.9; None = no EMA)"})
    every: int = field(default=1, metadata={"ge": 1, "help": "steps between EMA updates"})
    warmup: bool = field(default=True, metadata={
        "help": "flow_grpo's warm-up min(decay, (1 + s) / (10 + s)); false: the fixed decay from the first "
                "update (the EMA starts at the pretrained weights, so there is no initialisation to forget)"})


@dataclass
class BaseTrainConfig:
    """The `train:` fields every online recipe shares, with its sections `advantage`, `balance` and `ema`; each
    recipe subclasses it with its own fields."""

    # Flat names of fields that moved into a section; a config that still uses them loads with a warning.
    MOVED: ClassVar[dict[str, str]] = {
        "advantage_mode": "advantage.mode", "adv_clip": "advantage.clip", "adv_eps": "advantage.eps",
        "global_std": "advantage.global_std", "cmo_tau": "advantage.cmo_tau",
        "hypervolume_reference": "advantage.hypervolume_reference", "pareto_filter": "advantage.pareto_filter",
        "best_of_n": "advantage.best_of_n", "constraints": "advantage.constraints",
        "constraint_lr": "advantage.constraint_lr", "balance": "balance.method", "balance_ema": "balance.ema",
        "balance_normalize": "balance.normalize", "balance_track": "balance.track",
        "balance_safeguard": "balance.safeguard", "balance_amortized": "balance.amortized",
        "balance_gram": "balance.gram", "balance_every": "balance.every",
        "balance_refresh_batches": "balance.refresh_batches", "cagrad_c": "balance.cagrad_c",
        "ema_decay": "ema.decay", "ema_every": "ema.every", "ema_warmup": "ema.warmup"}

    prompts: str = field(default="world:seen", metadata={"help": "world:seen, or a .txt / .jsonl file"})
    max_steps: int = field(default=100, metadata={"ge": 1, "help": "rollout-and-update iterations"})
    prompts_per_step: int = field(default=16, metadata={"ge": 1, "help": "prompt groups per step (all processes)"})
    group_size: int = field(default=8, metadata={"ge": 2, "help": "samples per prompt (G)"})
    train_batch_size: int = field(default=16, metadata={"ge": 1,
        "help": "samples per training micro-batch (per process)"})
    optimizer_steps_per_rollout: int = field(default=1, metadata={"ge": 1, "help": "flow_grpo uses 2"})
    lr: float = field(default=3e-4, metadata={"gt": 0, "help": "AdamW learning rate (flow_grpo LoRA: 3e-4)"})
    lr_schedule: Literal["constant", "linear", "cosine"] = field(default="constant", metadata={
        "help": "learning-rate decay over train.max_steps (to 0 at the end; trainers.engine.lr_factor)"})
    lr_warmup_steps: int = field(default=0, metadata={"ge": 0,
        "help": "steps of linear warm-up from lr / (warmup + 1)"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"ge": 0, "lt": 1, "help": "AdamW betas"})
    weight_decay: float = field(default=1e-4, metadata={"ge": 0, "help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"gt": 0, "help": "gradient clipping"})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "autocast"})
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self):
        if self.lr_warmup_steps >= self.max_steps:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} must be < max_steps={self.max_steps}")
        n = self.advantage.best_of_n
        if n is not None and n > self.group_size:
            raise ValueError(f"advantage.best_of_n={n} must be <= group_size={self.group_size}")
        if self.balance.on and (self.advantage.mode != "sum_then_normalize" or self.advantage.constraints):
            raise ValueError("balance combines per-reward gradients; it excludes advantage.mode / "
                             "advantage.constraints")

    def check_with_sampling(self, sampling: SamplingConfig) -> None:
        """Checks of `train:` fields against `sampling:` (the recipe config calls it); none by default."""


# A recipe's `reward_options` field, the same in every trainer config:
#     reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=REWARD_OPTIONS_HELP)
REWARD_OPTIONS_HELP = {
    "help": "constructor options per reward, e.g. {pickscore: {model: /ckpt/PickScore_v1}, artifact: {weights: "
            "artifact.safetensors}}; applies wherever that reward is used (trained, held-out, drift)"}


def check_rewards(trained: dict[str, float], heldout: list[str], required: bool = True,
                  sampling: SamplingConfig | None = None, train: BaseTrainConfig | None = None,
                  options: dict[str, dict[str, Any]] | None = None) -> None:
    """Config-time check of a recipe's `rewards` (non-empty unless not required) and `eval_rewards` names, of
    the rollout drift's rewards (known, differentiable), of the multi-reward options and of `reward_options`,
    before any model loads."""
    if required and not trained:
        raise ValueError("rewards must name at least one reward")
    if train is not None:
        adv, bal = train.advantage, train.balance
        multi = bal.on or adv.mode != "sum_then_normalize" or adv.pareto_filter
        if multi and len(trained) < 2:
            raise ValueError("train.balance / advantage.mode / advantage.pareto_filter need at least two trained "
                             "rewards")
        if adv.constraints:
            unknown = [k for k in adv.constraints if k not in trained]
            if unknown or len(adv.constraints) >= len(trained):
                raise ValueError("train.advantage.constraints must name some, not all, trained rewards; "
                                 f"got {list(adv.constraints)} for rewards {list(trained)}")
        if bal.on:
            check_weights(bal.method, trained, bal.normalize)
        if adv.hypervolume_reference is not None and set(adv.hypervolume_reference) != set(trained):
            raise ValueError("train.advantage.hypervolume_reference must give one value per trained reward")
    drift = drift_reward_weights(sampling, trained) if sampling is not None else {}
    for name in [*trained, *heldout, *drift]:
        if name.startswith((FRAMES_PREFIX, *SERVICES)) or composite_parts(name) is not None:
            rewards_lib.describe(name)  # the wrapped rewards must exist (frames/: and score images; remote: served)
        elif name not in rewards_lib.REGISTRY and "." not in name:
            raise ValueError(f"unknown reward {name!r}{did_you_mean(name, rewards_lib.list_rewards())}; allowed: "
                             f"{', '.join(rewards_lib.list_rewards())}, "
                             "frames/<image reward>, a transform such as ensemble(<reward>,<reward>), "
                             "remote:http://HOST:PORT/NAME, worker:PYTHON:NAME")
    for name in drift:
        if not rewards_lib.describe(name)["differentiable"]:
            raise ValueError(f"sampling.drift needs differentiable rewards; {name} is not (set "
                             "sampling.drift.rewards to differentiable ones, e.g. world-soft)")
    used = list(dict.fromkeys([*trained, *heldout, *drift]))
    for name, opts in (options or {}).items():
        if name not in used:
            raise ValueError(f"reward_options names {name!r}, which this recipe does not use; its rewards: {used}")
        rewards_lib.check_options(name, opts)
    for name in used:  # a transform's required options (par's and log-sigmoid's ref) even when none are given
        if composite_parts(name) is not None and name not in (options or {}):
            rewards_lib.check_options(name, {})


def groupwise_rewards(cfg) -> list[str]:
    """A recipe's trained and held-out rewards that score whole prompt groups as sets (`Reward.groupwise`)."""
    return [name for name in dict.fromkeys([*cfg.rewards, *cfg.eval_rewards])
            if rewards_lib.describe(name)["groupwise"]]


def check_groupwise_rewards(cfg) -> None:
    """Before any model loads: a groupwise reward (e.g. dragon-mmd) gets whole prompt groups of at least its
    `min_group_size`, so every sampling batch (scored on its own) holds whole groups; evaluation scores its
    samples as one group, of `run.eval_num_prompts`; its options are checked even when `reward_options` omits it."""
    group_size = cfg.train.group_size
    for name in groupwise_rewards(cfg):
        rewards_lib.check_options(name, cfg.reward_options.get(name, {}))
        least = rewards_lib.describe(name)["min_group_size"]
        if group_size < least:
            raise ValueError(f"train.group_size={group_size}: reward {name} scores each prompt group as a set of at "
                             f"least {least} samples; set train.group_size >= {least}")
        if cfg.sampling.batch_size % group_size:
            raise ValueError(f"sampling.batch_size={cfg.sampling.batch_size} must be a multiple of train.group_size="
                             f"{group_size}: reward {name} scores each prompt group whole, and every sampling batch "
                             "is scored on its own")
        if cfg.run.eval_every and cfg.run.eval_num_prompts < least:
            raise ValueError(f"run.eval_num_prompts={cfg.run.eval_num_prompts}: evaluation scores its samples as "
                             f"one set for reward {name}, which needs at least {least}")


def check_groups_per_process(cfg, num_processes: int) -> None:
    """Every process samples whole prompt groups when a reward scores groups as sets (the gather of scores comes
    after scoring)."""
    names = groupwise_rewards(cfg)
    if names and cfg.train.prompts_per_step % num_processes:
        raise ValueError(f"train.prompts_per_step={cfg.train.prompts_per_step} must be divisible by the "
                         f"{num_processes} processes: {', '.join(names)} scores each prompt group whole, on the "
                         "process that sampled it")


def drift_reward_weights(sampling: SamplingConfig, trained: dict[str, float]) -> dict[str, float]:
    """The rewards the rollout drift climbs: `drift_rewards`, else the trained ones; {} when the drift is off."""
    if sampling.drift.scale == 0:
        return {}
    return dict(sampling.drift.rewards) if sampling.drift.rewards is not None else dict(trained)


@dataclass
class RecipeConfig:
    """The sections of every recipe's config. A recipe's config subclasses it and overrides `trainer` (its name),
    `train` (its own section, a `BaseTrainConfig` subclass) and, if it samples differently, `sampling`'s default;
    `__post_init__` checks the rewards and their options against the sections before any model loads."""

    trainer: str = field(default="", metadata={"help": "which trainer runs"})
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"world-verifier": 1.0},
                                      metadata={"help": "trained rewards and their weights"})
    eval_rewards: list[str] = field(default_factory=list, metadata={"help": "held-out rewards, logged only"})
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata=REWARD_OPTIONS_HELP)

    def rewards_required(self) -> bool:
        return True

    def drift_metrics(self) -> tuple[str, ...]:
        """The `drift/*` diagnostics this recipe logs (visalign.trainers.diagnostics): by default its rollout's."""
        return ROLLOUT_DRIFT

    def __post_init__(self):
        check_ranges(self)  # a config built in Python gets the checks loading does
        self.train.check_with_sampling(self.sampling)
        check_rewards(self.rewards, self.eval_rewards, required=self.rewards_required(), sampling=self.sampling,
                      train=self.train, options=self.reward_options)
        logged = self.drift_metrics()
        for name in self.run.alarm.watch:
            if name not in logged:
                raise ValueError(f"run.alarm.watch: {name} is not logged by trainer={self.trainer} with these "
                                 f"settings; it logs {', '.join(logged)}")
        check_groupwise_rewards(self)
        check_model_and_paths(self)


def check_model_and_paths(cfg) -> None:
    """Before any model loads: model.path exists (or is a hub id), the size and frame count fit the model's rules
    where it can tell without its weights, the prompt sources and a named resume_from exist."""
    m = cfg.model
    if m.path is not None:
        try:
            resolve_model_path(m.path)
        except ValueError as err:
            raise ValueError(f"model.path: {err}") from None
    check_model_options(m.name, m.options)
    rules = request_rules(m.name, m.path)
    if rules is not None:
        rules.check(m.height, m.width, m.num_frames, prefix="model.")
    edits = None if rules is None else rules.edits
    if edits and m.free_text_encoders:
        raise ValueError(f"model.free_text_encoders: {m.name} edits source images, so its conditioning depends on each "
                         "prompt's image and cannot be encoded once up front; set it to false")
    check_prompt_spec(cfg.train.prompts, "train.prompts", edits)
    if cfg.run.eval_prompts is not None:
        check_prompt_spec(cfg.run.eval_prompts, "run.eval_prompts", edits)
    resume = cfg.run.resume_from
    if resume not in (None, "latest") and not Path(resume).is_dir():
        raise ValueError(f"run.resume_from={resume!r}: no such checkpoint directory (give latest, null, or "
                         "out_dir/checkpoints/checkpoint-N)")


def batch_std_advantage() -> AdvantageConfig:
    """The `train.advantage` default of recipes that normalise by the batch's std (AWM, DGPO)."""
    return AdvantageConfig(global_std=True)


def ode_sampling() -> SamplingConfig:
    """The `sampling` default of recipes that need no log-probabilities: the ODE."""
    return SamplingConfig(sde="ode")
