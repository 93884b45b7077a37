"""Machinery every online trainer shares: distributed prompt groups, rollouts with rewards,
EMA, checkpoints that verify themselves, and the trainer's own state saved as data (safetensors + JSON).

Determinism: everything random in a step derives from (seed, step[, rank]) through explicit generators, so a
resumed run replays exactly the rollouts and updates of an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from visalign import rewards as rewards_lib
from visalign.models.base import Conditioning, FlowModelAdapter, encode
from visalign.prompts import SOURCE_IMAGE, Prompt, PromptSource, prompts_of, source_images
from visalign.rewards.base import Reward, RewardError, combined
from visalign.sampling import SDEOptions, Trajectory, sample
from visalign.trainers.sharding import like, local


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, salt)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7919 + salt)


# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class StepPlan:
    """Which samples of a step this process owns. Samples are numbered globally: prompt p's group is
    samples [p*G, (p+1)*G); process r owns the contiguous slice [r*n, (r+1)*n), so a gather in rank order
    restores the global order and every group is whole in the gathered batch."""

    items: list[Prompt]  # this process's samples, in global order
    groups: Tensor  # global group id per local sample
    seeds: list[int]  # per-sample seeds
    start: int  # global index of the first local sample
    total: int  # samples across all processes


def plan_step(source: PromptSource, *, seed: int, step: int, prompts_per_step: int, group_size: int,
              rank: int, world_size: int) -> StepPlan:
    total = prompts_per_step * group_size
    if total % world_size:
        raise ValueError(f"prompts_per_step × group_size = {total} must be divisible by the {world_size} processes")
    prompts = prompts_of(source.draw(prompts_per_step, step_generator(seed, step, 1)), f"step {step}'s prompts")
    n = total // world_size
    start = rank * n
    index = range(start, start + n)
    items = [prompts[i // group_size] for i in index]
    groups = torch.tensor([i // group_size for i in index])
    seeds = [(seed * 1_000_003 + step) * 65_537 + i for i in index]
    return StepPlan(items, groups, seeds, start, total)


# ---------------------------------------------------------------------------------------------- rewards


def load_rewards(names: dict[str, float] | list[str], options: dict[str, dict] | None = None) -> dict[str, Reward]:
    """The named rewards, each built with its constructor options from `options` (a config's `reward_options`)."""
    options = options or {}
    return {name: rewards_lib.load(name, **options.get(name, {})) for name in names}


@dataclass
class Scores:
    """A batch's scores, kept apart: `trained` (each trained reward's combined score [B], what advantages read),
    `sub` (the sub-scores of dict-valued rewards, "reward/sub" -> [B], logged) and `heldout` (held-out rewards,
    logged only). Non-finite scores are NaN."""

    trained: dict[str, Tensor]
    sub: dict[str, Tensor] = field(default_factory=dict)
    heldout: dict[str, Tensor] = field(default_factory=dict)

    def map(self, fn: Callable[[Tensor], Tensor]) -> Scores:
        """The same scores with `fn` applied to every tensor (e.g. a gather across processes)."""
        return Scores(*({k: fn(v) for k, v in part.items()} for part in (self.trained, self.sub, self.heldout)))

    @staticmethod
    def cat(parts: list[Scores]) -> Scores:
        """Batches' scores joined in order."""
        return Scores(*({k: torch.cat([getattr(p, part)[k] for p in parts]) for k in getattr(parts[0], part)}
                        for part in ("trained", "sub", "heldout")))

    def metrics(self) -> dict[str, float]:
        """Mean and std of every finite score: `rewards/NAME[/SUB]/...` for trained rewards, `heldout/NAME[/SUB]/...`
        for held-out ones."""
        named = {f"rewards/{k}": v for k, v in self.trained.items()}
        def heldout(sub: str) -> bool:  # reward names may hold a "/" themselves (frames/pickscore)
            return any(sub.startswith(f"{name}/") for name in self.heldout)

        named.update({f"{'heldout' if heldout(k) else 'rewards'}/{k}": v for k, v in self.sub.items()})
        named.update({f"heldout/{k}": v for k, v in self.heldout.items()})
        out = {}
        for k, v in named.items():
            finite = v[torch.isfinite(v)]
            out[f"{k}/mean"] = finite.mean().item() if len(finite) else float("nan")
            out[f"{k}/std"] = finite.std().item() if len(finite) > 1 else 0.0
        return out


def score_rewards(reward_fns: dict[str, Reward], images: Tensor, items: list[Prompt],
                  groups: Tensor | None = None) -> tuple[dict, dict]:
    """({name: combined score [B]}, {name/sub: sub-score [B]} of dict outputs). Non-finite scores are NaN.
    `groups`: each sample's prompt-group id, which groupwise rewards (e.g. dragon-mmd) score as sets; without it
    they take the batch as one set (evaluation)."""
    prompts = [it.text for it in items]
    metadata = [dict(it.metadata) for it in items]
    media = {"videos": images} if images.ndim == 5 else {"images": images}
    scores, sub = {}, {}
    with torch.no_grad():
        for name, fn in reward_fns.items():
            try:
                result = fn(prompts=prompts, metadata=metadata, groups=groups, allow_invalid=True, **media)
            except Exception as err:  # any fault of a reward's code: named, with the batch it failed on
                shown = ", ".join(repr(p[:40] + ("…" if len(p) > 40 else "")) for p in prompts[:3])
                raise RewardFailed(name, f"reward {name!r} raised {type(err).__name__}: {err} (on a batch of "
                                         f"{len(prompts)} samples; prompts {shown}"
                                         f"{', …' if len(prompts) > 3 else ''})") from err
            scores[name] = combined(result).float().cpu()
            if isinstance(result, dict):
                sub.update({f"{name}/{k}": v.float().cpu() for k, v in result.items() if k != "score"})
    return scores, sub


# ---------------------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """One process's share of a step: trajectories, images, rewards, conditioning."""

    traj: Trajectory
    images: Tensor
    scores: Scores
    cond: Conditioning
    plan: StepPlan
    timings: dict[str, float]


def _cat_trajectories(parts: list[Trajectory]) -> Trajectory:
    first = parts[0]
    return Trajectory(latents=torch.cat([p.latents for p in parts]), x0_preds=torch.cat([p.x0_preds for p in parts]),
                      means=torch.cat([p.means for p in parts]), stds=torch.cat([p.stds for p in parts]),
                      log_probs=torch.cat([p.log_probs for p in parts]), sigmas=first.sigmas,
                      stochastic=first.stochastic, sde=first.sde,
                      drifts=None if first.drifts is None else torch.cat([p.drifts for p in parts]))


def rollout(adapter: FlowModelAdapter, plan: StepPlan, reward_fns: dict[str, Reward], *, num_steps: int,
            guidance: float, sde: SDEOptions, batch_size: int, height: int, width: int,
            num_frames: int | None, same_noise_per_group: bool, autocast=None, drift=None,
            decode_batch: int | None = None) -> Rollout:
    """Sample the plan in batches and score each batch in a worker thread while the next one samples.
    `autocast`: a callable returning a fresh autocast context (e.g. `accelerator.autocast`), or None.
    `drift`: (RewardDrift, {name: (Reward, weight)}) to shift the SDE steps up those rewards (Euphonium)."""
    t0 = time.perf_counter()
    prompts = [it.text for it in plan.items]
    # A group repeats its prompt G times: encode each distinct prompt (with its source image, when editing) once,
    # then index.
    keys = [(it.text, it.metadata.get(SOURCE_IMAGE)) for it in plan.items]
    first: dict[tuple, Prompt] = {}
    for key, item in zip(keys, plan.items, strict=True):
        first.setdefault(key, item)
    position = {k: i for i, k in enumerate(first)}
    firsts = list(first.values())
    sources = source_images(firsts, (height, width))
    cond = encode(adapter, [it.text for it in firsts], cfg=adapter.guidance == "cfg" and guidance > 1, images=sources)
    cond = cond.index([position[k] for k in keys])
    parts, futures, images = [], [], []
    sample_time = 0.0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for s in range(0, len(prompts), batch_size):
            sl = slice(s, s + batch_size)
            ts = time.perf_counter()
            drift_fn = None
            if drift is not None:
                items = plan.items[sl]
                drift_fn = drift[0].bind(adapter, drift[1], [it.text for it in items],
                                         [dict(it.metadata) for it in items])
            with autocast() if autocast is not None else nullcontext():
                traj = sample(adapter, cond.index(sl), num_steps=num_steps, height=height, width=width,
                              num_frames=num_frames, guidance_scale=guidance, sde=sde, seeds=plan.seeds[sl],
                              noise_groups=plan.groups[sl].tolist() if same_noise_per_group else None,
                              drift=drift_fn)
                with torch.no_grad():
                    pixels = decode_in_chunks(adapter, traj.final, decode_batch)
            sample_time += time.perf_counter() - ts
            parts.append(traj)
            images.append(pixels)
            # Each batch holds whole prompt groups when a reward is groupwise (checked by the trainer config).
            futures.append(pool.submit(score_rewards, reward_fns, pixels, plan.items[sl], plan.groups[sl]))
        tr = time.perf_counter()
        scored = [f.result() for f in futures]
        reward_wait = time.perf_counter() - tr
    scores = Scores.cat([Scores(*s) for s in scored])
    timings = {"time/sampling": sample_time, "time/reward_wait": reward_wait, "time/rollout": time.perf_counter() - t0}
    return Rollout(_cat_trajectories(parts), torch.cat(images), scores, cond, plan, timings)


def decode_in_chunks(adapter: FlowModelAdapter, latents: Tensor, batch: int | None) -> Tensor:
    """Pixels of `latents`, decoded `batch` at a time (`sampling.decode_batch`: a real VAE's activations at 512 px
    or on video are a peak of their own); all at once when None."""
    step = batch or len(latents)
    return torch.cat([adapter.decode(latents[i:i + step]).float() for i in range(0, len(latents), step)])


class TrainingFault(RuntimeError):
    """A run stopped by a fault it cannot train through (rewards that raise, too many skipped steps, a full
    disk); the message names the cause, and the last checkpoint is intact."""


class RewardFailed(TrainingFault):
    """A reward raised while scoring; `name` is the reward's."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class NoValidRewards(RewardError):
    """Every sample of a step has an invalid reward: the trainer skips the step (and counts it)."""


def check_rewards_valid(scores: dict[str, Tensor], names, step: int) -> Tensor:  # scores: Scores.trained
    """Bool [N]: samples whose every trained reward is finite; all invalid raises NoValidRewards."""
    valid = torch.ones_like(next(iter(scores.values())), dtype=torch.bool)
    for name in names:
        valid &= torch.isfinite(scores[name])
    if not valid.any():
        raise NoValidRewards(f"step {step}: every sample has an invalid (NaN/inf) reward from {', '.join(names)}")
    return valid


# ---------------------------------------------------------------------------------------------- EMA


def pinned_cpu(t: Tensor) -> Tensor:
    """`t` in CPU memory, page-locked when a GPU is present (so copies to it can run asynchronously)."""
    return t.cpu().pin_memory() if torch.cuda.is_available() else t.cpu()


class ParamCopy:
    """A second copy of the trainable parameters that can be swapped into the live model: the reference policy
    of DPO (refreshed every N steps), DiffusionNFT's old policy (blended softly), the EMA of trained weights.
    Has state_dict for checkpoints."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.shadow = [p.detach().clone() for p in params]

    def offload(self) -> None:
        """Keep the copy in (pinned) CPU memory: each blend and swap then moves it across (model.offload_copies)."""
        self.shadow = [pinned_cpu(s) for s in self.shadow]

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * live."""
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().to(s.device), 1 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and shadow weights (call twice to restore); across devices when offloaded."""
        for s, p in zip(self.shadow, self.params, strict=True):
            tmp = p.detach().to(s.device, copy=True)
            p.copy_(s)
            s.copy_(tmp)

    @contextmanager
    def swapped(self):
        """The shadow weights are live inside the block; the trained ones are restored on exit."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self) -> dict:  # of sharded parameters, this process's shards
        return {"shadow": [local(s).clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            local(s).copy_(v)


class EMA(ParamCopy):
    """Exponential moving average of trainable parameters (flow_grpo `flow_grpo/ema.py`: decay with warm-up
    min(decay, (1 + s) / (10 + s)), updated every `every` steps; `warmup=False`: the fixed decay throughout)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float, every: int = 1, warmup: bool = True):
        super().__init__(params)
        self.decay, self.every, self.warmup = decay, every, warmup
        self.updates = 0

    def update(self, step: int) -> None:
        if step % self.every:
            return
        self.blend(min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.updates = int(state["updates"])


class TrainerState:
    """The step counter, the skip counts (steps or optimizer steps skipped for invalid rewards or a non-finite
    loss / gradient: in all, and in a row) and the disabled held-out rewards, saved with the trainer's state."""

    def __init__(self):
        self.step = 0
        self.skipped = 0
        self.in_a_row = 0
        self.disabled: list[str] = []  # held-out rewards switched off after they raised

    def state_dict(self) -> dict:
        return {"step": self.step, "skipped": self.skipped, "in_a_row": self.in_a_row, "disabled": self.disabled}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))
        self.disabled = [str(name) for name in state.get("disabled", [])]


# ---------------------------------------------------------------------------------------------- checkpoints

MANIFEST = "manifest.json"


def check_writable(directory: Path, field_name: str) -> None:
    """Create `directory` and write a file in it, or say which setting names a place that cannot be written."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{field_name}={str(directory)!r} is not writable: {err.strerror or err}") from err


def disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or the messages torch's zip writer and safetensors give
    for it (`unexpected pos` / `os error 28`)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "os error 28", "unexpected pos"))


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)`, fsync, then rename over `path`: a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_trainer_state(states: dict[str, dict], directory: Path, name: str = "trainer_state") -> None:
    """The trainer's own state (step, EMA, old policy, balancer, alarm history, ...: `{name: obj.state_dict()}`)
    as data, never pickles: every tensor into trainer_state.safetensors, everything else (numbers, strings,
    lists, dicts, None) into trainer_state.json, where a tensor stands as {"__tensor__": its key}."""
    tensors: dict[str, Tensor] = {}

    def encode(value, path: str):
        if isinstance(value, Tensor):  # a sharded tensor: this process's shard
            tensors[path] = local(value).detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise TypeError(f"trainer state {path}: dict keys must be strings, got {list(value)}")
            return {k: encode(v, f"{path}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"trainer state {path}: {type(value).__name__} is not a tensor, number, string, list or dict")

    data = {key: encode(state, key) for key, state in states.items()}
    atomic_write(directory / f"{name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(directory / f"{name}.json", lambda p: p.write_text(json.dumps(data, indent=1)))


def load_trainer_state(directory: Path, name: str = "trainer_state") -> dict[str, dict]:
    """What `save_trainer_state` wrote, read with safetensors and json only."""
    if not (directory / f"{name}.json").exists():
        old = sorted(p.name for p in [*directory.glob("*.pkl"), *directory.glob("*.bin")])
        why = (f"it holds the pickles {old} of an older visalign, which resume does not unpickle (they can run code)"
               if old else f"{name}.json is missing")
        raise ValueError(f"checkpoint {directory} cannot be resumed: {why}")
    tensors = load_file(str(directory / f"{name}.safetensors"))

    def decode(value):
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return {key: decode(state) for key, state in json.loads((directory / f"{name}.json").read_text()).items()}


def rng_states() -> dict:
    """This process's random states (python, numpy, torch CPU and CUDA, as accelerate saves them) as tensors and
    numbers, for `save_trainer_state`: restored by `set_rng_states` without unpickling."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached": float(cached)},
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict) -> None:
    py, npy = states["python"], states["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def optimizer_state(optimizer) -> dict:
    """An optimizer's state_dict with string keys (JSON's), for `save_trainer_state` (which keeps this process's
    shard of a sharded parameter's state)."""
    sd = optimizer.state_dict()
    return {"state": {str(k): v for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load what `optimizer_state` saved; a sharded parameter's state becomes a shard laid out like it."""
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in state["param_groups"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    optimizer.load_state_dict({"state": {int(k): {name: like(v, params[int(k)]) if isinstance(v, Tensor) else v
                                                  for name, v in s.items()}
                                         for k, s in state["state"].items()}, "param_groups": groups})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """Written last: a checkpoint without a manifest is incomplete and never resumed from."""
    files = {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")}
    atomic_write(directory / MANIFEST, lambda p: p.write_text(json.dumps({"step": step, "files": files}, indent=1)))


def verify_checkpoint(directory: Path) -> int:
    """Check every file against the manifest; raise ValueError naming the first bad or missing file."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise ValueError(f"checkpoint {directory} is incomplete: {MANIFEST} is missing")
    try:
        data = json.loads(manifest.read_text())
        files, step = dict(data["files"]), int(data["step"])
    except (ValueError, KeyError, TypeError) as err:  # truncated, empty, or not a manifest
        raise ValueError(f"checkpoint {directory}: {MANIFEST} is damaged ({type(err).__name__}: {err})") from None
    for name, digest in files.items():
        path = directory / name
        if not path.exists():
            raise ValueError(f"checkpoint {directory}: file {name} is missing")
        if _sha256(path) != digest:
            raise ValueError(f"checkpoint {directory}: file {name} is corrupted or truncated (checksum mismatch)")
    return step


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (with a manifest) under root/checkpoints, oldest first."""
    base = root / "checkpoints"
    if not base.exists():
        return []
    found = [d for d in base.glob("checkpoint-*") if (d / MANIFEST).exists()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def resolve_resume(root: Path, resume_from: str | None) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "latest":
        dirs = checkpoint_dirs(root)
        return dirs[-1] if dirs else None
    path = Path(resume_from)
    if not path.exists():
        raise ValueError(f"resume_from={resume_from!r} does not exist")
    return path


def trim_metrics(path: Path, step: int) -> int:
    """Keep the lines of metrics.jsonl for steps before `step` (the resumed one), so redone steps are not logged
    twice; a line cut short by a crash goes too. Returns how many lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["step"]) < step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write(path, lambda p: p.write_text("".join(f"{line}\n" for line in kept)))
    return dropped


def prune_checkpoints(root: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    dirs = checkpoint_dirs(root)
    for d in dirs[: max(0, len(dirs) - total_limit)]:
        shutil.rmtree(d)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_trained_steps(n_stochastic: int, fraction: float) -> int:
    """How many of a sample's stochastic steps are trained: at least one, at most all."""
    return max(1, min(n_stochastic, math.ceil(n_stochastic * fraction)))
