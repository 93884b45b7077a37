"""Rewards built from other rewards: weighted sums, the log-sigmoid and PAR transforms, conservative ensembles.

Each composite is itself a `Reward`: it calls its members (by registry name or as instances) on the same
batch, returns the combined "score" plus every member's score as a sub-score named after the member (and a
member's own sub-scores as "<member>/<key>"), and is differentiable iff all its members are.

    WeightedSum({"aesthetic": 1.0, "artifact": 0.5})                 sum_i w_i r_i
    LogSigmoidSum({"pickscore": 21.0, "artifact": 0.5})              sum_i log sigmoid(r_i - ref_i)
    PARSigmoid("pickscore", ref=21.0)                                sigmoid(r - ref)
    Ensemble(["hpsv2", "pickscore"], mode="mean_minus_std", k=1.0)   mean_i r_i - k std_i r_i

Members are not rescaled: give a weighted sum or an ensemble members on comparable scales.

Each is also registered by name (`visalign.rewards.registry.COMPOSITES`), its members in parentheses and its options
from `named_args` (in a config, `reward_options` under the same name):

    weighted-sum(aesthetic,artifact)   {weights: {aesthetic: 1.0, artifact: 0.5}}   (default weight 1)
    log-sigmoid(pickscore,artifact)    {ref: {pickscore: 21.0, artifact: 0.5}}      (or one number for all)
    par(pickscore)                     {ref: 21.0}
    ensemble(hpsv2,pickscore)          {mode: mean_minus_std, k: 1.0}

and every form takes `member_options: {member: {its options}}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from visalign.rewards.base import Reward, RewardError, combined
from visalign.rewards.registry import load

RewardLike = str | Reward
# A reference reward: one number for every prompt, or a per-prompt mapping. PAR also takes several
# references (a sequence, or a sequence per prompt) and averages the sigmoids over them.
Reference = float | Sequence[float] | Mapping[str, float | Sequence[float]]


def _resolve(member: RewardLike, options: Mapping[str, dict]) -> Reward:
    if isinstance(member, Reward):
        return member
    if isinstance(member, str):
        return load(member, **options.get(member, {}))
    raise TypeError(f"a member must be a registry name or a visalign.rewards.Reward, got {type(member).__name__}")


def _per_member(name: str, option: str, value, members: Sequence[str], default=None) -> dict:
    """A name form's per-member option: one value for every member, or a {member: value} mapping naming each
    member once (members a mapping leaves out take `default`, if there is one)."""
    if not isinstance(value, Mapping):
        return dict.fromkeys(members, value)
    unknown = [k for k in value if k not in members]
    missing = [m for m in members if m not in value and default is None]
    if unknown or missing:
        raise ValueError(f"{name}: {option} must be one value for every member or a {{member: value}} mapping over "
                         f"{list(members)}; got keys {list(value)}")
    return {m: value.get(m, default) for m in members}


class _Composite(Reward):
    """Members resolved and named; `score` calls each once and collects their outputs as sub-scores.

    `member_options` builds members given by name with those constructor options ({member: {option: value}})."""

    def __init__(self, members: Sequence[RewardLike], name: str, batch_size: int = 1024,
                 member_options: Mapping[str, dict] | None = None, **kwargs):
        # Members batch themselves; the composite's own chunking only bounds how much it hands them at once.
        super().__init__(batch_size=batch_size, **kwargs)
        if not members:
            raise ValueError(f"{name}: needs at least one member reward")
        member_options = dict(member_options or {})
        stray = [k for k in member_options if k not in members]
        if stray:
            raise ValueError(f"{name}: member_options names {stray}, which are not members {list(members)}")
        self.members: dict[str, Reward] = {}
        for member in members:
            reward = _resolve(member, member_options)
            key = member if isinstance(member, str) else reward.name
            if key in self.members:
                raise ValueError(f"{name}: two members are named {key!r}; give one a distinct `name`")
            if reward.groupwise:  # a composite is called without the prompt groups
                raise ValueError(f"{name}: member {key!r} scores groups of samples (groupwise); list it among a "
                                 "trainer's rewards with its own weight instead")
            self.members[key] = reward
        self.name = name
        self.differentiable = all(r.differentiable for r in self.members.values())
        self.needs_prompts = any(r.needs_prompts for r in self.members.values())
        self.uses_source_images = any(r.uses_source_images for r in self.members.values())
        self.inputs = tuple(k for k in ("images", "videos") if all(k in r.inputs for r in self.members.values()))
        if not self.inputs:
            kinds = {key: r.inputs for key, r in self.members.items()}
            raise ValueError(f"{name}: members share no input kind: {kinds}")

    def member_scores(self, prompts, images, videos, metadata,
                      source_images=None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({member: combined score [B]}, {"<member>/<key>": sub-score [B]}).

        Members return invalid scores as NaN; the composite's own output check then raises naming the composite,
        or passes the NaN on when the caller asked for `allow_invalid`."""
        scores, subs = {}, {}
        for key, reward in self.members.items():
            out = reward(prompts=prompts, images=images, videos=videos, metadata=metadata,
                         source_images=source_images, allow_invalid=True)
            scores[key] = combined(out).float()
            if isinstance(out, dict):
                subs.update({f"{key}/{k}": v.float() for k, v in out.items() if k != "score"})
        return scores, subs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, members={list(self.members)})"


class WeightedSum(_Composite):
    """sum_i w_i r_i over member rewards.

    A lower-is-better member must get a negative weight (so that the sum stays higher-is-better)."""

    def __init__(self, rewards: Mapping[RewardLike, float], name: str = "weighted_sum", **kwargs):
        super().__init__(list(rewards), name, **kwargs)
        self.weights = {key: float(w) for key, w in zip(self.members, rewards.values(), strict=True)}
        for key, reward in self.members.items():
            if not reward.higher_is_better and self.weights[key] > 0:
                raise ValueError(f"{name}: member {key!r} is lower-is-better; give it a negative weight")
        ranges = [r.value_range for r in self.members.values()]
        if all(rng is not None for rng in ranges):
            low = sum(min(w * lo, w * hi) for w, (lo, hi) in zip(self.weights.values(), ranges, strict=True))
            high = sum(max(w * lo, w * hi) for w, (lo, hi) in zip(self.weights.values(), ranges, strict=True))
            self.value_range = (low, high)

    @classmethod
    def named_args(cls, name: str, members: list[str], *, weights: Mapping[str, float] | None = None,
                   member_options: Mapping[str, dict] | None = None) -> dict:
        """`weighted-sum(a,b)`'s constructor arguments: `weights` {member: w}, 1 for a member left out."""
        per = _per_member(name, "weights", {} if weights is None else weights, members, default=1.0)
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in per.values()):
            raise ValueError(f"{name}: weights must be numbers, got {per}")
        return {"rewards": per, "member_options": member_options}

    def score(self, *, prompts, images, videos, metadata, source_images=None):
        scores, subs = self.member_scores(prompts, images, videos, metadata, source_images)
        total = sum(self.weights[key] * value for key, value in scores.items())
        return {"score": total, **scores, **subs}


def _check_reference(name: str, ref, several: bool) -> None:
    """A reference's form, before any model loads: a number (or, with `several`, a list of numbers), or a
    {prompt: that} mapping."""
    def ok(value) -> bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        return several and isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)

    if not (ok(ref) or isinstance(ref, Mapping) and all(isinstance(k, str) and ok(v) for k, v in ref.items())):
        allowed = "a number or a list of numbers" if several else "a number"
        raise ValueError(f"{name}: ref={ref!r} must be {allowed}, or a {{prompt: {allowed}}} mapping")


def _reference_tensor(ref: Reference, prompts: list[str] | None, batch: int, label: str,
                      device: torch.device) -> Tensor:
    """The reference rewards as [B, M] (M references per sample)."""
    if isinstance(ref, Mapping):
        if prompts is None:
            raise RewardError(f"{label}: a per-prompt reference needs prompts=")
        missing = [p for p in prompts if p not in ref]
        if missing:
            raise RewardError(f"{label}: no reference reward for prompt {missing[0]!r}")
        rows = [ref[p] for p in prompts]
    else:
        rows = [ref] * batch
    rows = [[float(v)] if isinstance(v, (int, float)) else [float(x) for x in v] for v in rows]
    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise RewardError(f"{label}: every sample needs the same, non-zero number of reference rewards")
    return torch.tensor(rows, dtype=torch.float32, device=device)


class LogSigmoidSum(_Composite):
    """LSC transform and conjunction (Wang et al. 2024, "Transforming and Combining Rewards for Aligning Large
    Language Models", arXiv 2402.00742): u_i = log sigmoid(r_i - ref_i) per member, combined by summation,
    which corresponds to the log-probability that the output is "good" in every property.

    `ref_i` is the member's reference reward for the prompt (the paper centres on rewards of the base
    policy's samples): one float, or a {prompt: float} mapping. A single member gives the plain transform.
    Sub-scores: each member's raw score under its name and its utility as "<member>/utility"."""

    value_range = None  # (-inf, 0]

    def __init__(self, rewards: Mapping[RewardLike, Reference], name: str = "log_sigmoid_sum", **kwargs):
        super().__init__(list(rewards), name, **kwargs)
        self.refs = dict(zip(self.members, rewards.values(), strict=True))
        for key, reward in self.members.items():
            if not reward.higher_is_better:
                raise ValueError(f"{name}: member {key!r} is lower-is-better; negate it first")

    @classmethod
    def named_args(cls, name: str, members: list[str], *, ref: Reference | Mapping[str, Reference],
                   member_options: Mapping[str, dict] | None = None) -> dict:
        """`log-sigmoid(a,b)`'s constructor arguments: `ref` one reference for every member, or {member: ref}
        (each a float or a {prompt: float} mapping)."""
        by_member = isinstance(ref, Mapping) and bool(ref) and set(ref) <= set(members)
        refs = _per_member(name, "ref", ref, members) if by_member else dict.fromkeys(members, ref)
        for value in refs.values():
            _check_reference(name, value, several=False)
        return {"rewards": refs, "member_options": member_options}

    def score(self, *, prompts, images, videos, metadata, source_images=None):
        scores, subs = self.member_scores(prompts, images, videos, metadata, source_images)
        total, utilities = 0.0, {}
        for key, value in scores.items():
            ref = _reference_tensor(self.refs[key], prompts, value.shape[0], f"{self.name}[{key}]", value.device)
            if ref.shape[1] != 1:
                raise RewardError(f"{self.name}[{key}]: the log-sigmoid transform takes one reference per prompt")
            utilities[f"{key}/utility"] = F.logsigmoid(value - ref[:, 0])
            total = total + utilities[f"{key}/utility"]
        return {"score": total, **scores, **utilities, **subs}


class PARSigmoid(_Composite):
    """Preference As Reward (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF",
    arXiv 2502.18770): sigmoid(r - ref), averaged over the references when there are several
    (r_RL = 1/M sum_m sigmoid(r - r_ref_m)). Bounded in (0, 1), steepest near the reference.

    `ref`: a float, a sequence of floats, or a {prompt: float | sequence} mapping."""

    value_range = (0.0, 1.0)

    def __init__(self, reward: RewardLike, ref: Reference, name: str = "par_sigmoid", **kwargs):
        super().__init__([reward], name, **kwargs)
        self.ref = ref
        key, member = next(iter(self.members.items()))
        if not member.higher_is_better:
            raise ValueError(f"{name}: member {key!r} is lower-is-better; negate it first")

    @classmethod
    def named_args(cls, name: str, members: list[str], *, ref: Reference,
                   member_options: Mapping[str, dict] | None = None) -> dict:
        """`par(a)`'s constructor arguments: one member, its `ref` a float, a list, or {prompt: float | list}."""
        if len(members) != 1:
            raise ValueError(f"{name}: PAR shapes one reward; it names {len(members)}: {members}")
        _check_reference(name, ref, several=True)
        return {"reward": members[0], "ref": ref, "member_options": member_options}

    def score(self, *, prompts, images, videos, metadata, source_images=None):
        scores, subs = self.member_scores(prompts, images, videos, metadata, source_images)
        value = next(iter(scores.values()))
        ref = _reference_tensor(self.ref, prompts, value.shape[0], self.name, value.device)
        return {"score": torch.sigmoid(value[:, None] - ref).mean(dim=1), **scores, **subs}


ENSEMBLE_MODES = ("mean", "min", "mean_minus_std")


def _check_ensemble(name: str, mode: str, k: float) -> None:
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"{name}: mode={mode!r} is not one of {ENSEMBLE_MODES}")
    if not isinstance(k, (int, float)) or k < 0:
        raise ValueError(f"{name}: k={k!r} must be a number >= 0")


class Ensemble(_Composite):
    """Conservative reward-model ensembles (Coste et al. 2024, "Reward Model Ensembles Help Mitigate
    Overoptimization", arXiv 2310.02743): the mean, the worst case ("min": the minimum, or the maximum for
    lower-is-better members), or the mean minus k standard deviations (population std, i.e. divided by the
    number of members) of the members' scores.

    Sub-scores: each member's score, and "mean" and "std" across members."""

    def __init__(self, rewards: Sequence[RewardLike] | Mapping[RewardLike, object], mode: str = "mean",
                 k: float = 1.0, name: str = "ensemble", **kwargs):
        _check_ensemble(name, mode, k)
        super().__init__(list(rewards), name, **kwargs)
        self.mode, self.k = mode, float(k)
        directions = {r.higher_is_better for r in self.members.values()}
        if len(directions) != 1:
            raise ValueError(f"{name}: members disagree on higher_is_better")
        self.higher_is_better = directions.pop()
        if self.mode == "mean_minus_std" and not self.higher_is_better:
            raise ValueError(f"{name}: mean_minus_std penalises disagreement only for higher-is-better members")
        ranges = [r.value_range for r in self.members.values()]
        if mode != "mean_minus_std" and all(rng is not None for rng in ranges):
            self.value_range = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))

    @classmethod
    def named_args(cls, name: str, members: list[str], *, mode: str = "mean", k: float = 1.0,
                   member_options: Mapping[str, dict] | None = None) -> dict:
        """`ensemble(a,b,...)`'s constructor arguments: `mode` and `k`."""
        _check_ensemble(name, mode, k)
        return {"rewards": members, "mode": mode, "k": k, "member_options": member_options}

    def score(self, *, prompts, images, videos, metadata, source_images=None):
        scores, subs = self.member_scores(prompts, images, videos, metadata, source_images)
        stacked = torch.stack(list(scores.values()), dim=1)  # [B, K]
        mean, var = stacked.mean(dim=1), stacked.var(dim=1, correction=0)
        # sqrt has an infinite slope at 0: members that agree exactly would otherwise give NaN gradients.
        std = torch.where(var > 0, var.clamp_min(1e-30).sqrt(), torch.zeros_like(var))
        if self.mode == "mean":
            total = mean
        elif self.mode == "min":
            total = stacked.amin(dim=1) if self.higher_is_better else stacked.amax(dim=1)
        else:
            total = mean - self.k * std
        return {"score": total, "mean": mean, "std": std, **scores, **subs}


__all__ = ["ENSEMBLE_MODES", "Ensemble", "LogSigmoidSum", "PARSigmoid", "WeightedSum"]
