"""Reward suites: any registered rewards over a prompt file, for images or videos, with confidence intervals,
per-category tables, sample grids, comparison mode and resumable scoring.

A suite is a prompt source plus a list of rewards. Presets name the usual ones, and where visalign ships a fitting
prompt set, its prompts (`PRESET_PROMPTS`; other prompts are the user's: DrawBench- or VBench-style files):

- `preference`: PickScore, HPSv2.1, ImageReward, LAION aesthetic (pass checkpoints with `reward_options`);
- `geneval`: `concepts-detector` (open-vocabulary detector + GenEval's rules) on `geneval:test`, the shipped
  GenEval-style set (or any JSONL whose lines carry a GenEval spec);
- `compbench`: `concepts-vqa` (T2I-CompBench-style attribute binding through per-concept VQA) on
  `geneval:test:color_attr,position`, the shipped set's attribute-binding and spatial prompts;
- `vbench`: the VBench-style video metrics (flicker, subject / background consistency, dynamic degree,
  motion smoothness);
- `world-rewards`: the world's verifier, strict judge and cleanliness plus saturation, on world prompts.

Prompt sources: a .txt file (one prompt per line), a .jsonl file ({"prompt", optional "category", any metadata
such as "spec"}), a shipped set such as `geneval:test` or `ocr:test`, or a registered source such as
`world:SPLIT[:TEMPLATES]` (n prompts per template, category = template; `visalign.prompts`).

Every (prompt, seed) sample is generated once with its own seed, quantised to 8 bits and stored under
`out/samples/`; every (sample, reward) score is appended to `out/scores.jsonl`. A rerun (same config) loads
both and only generates and scores what is missing, so an interrupted evaluation resumes, and adding a reward
scores only that reward. Scores are always computed on the stored 8-bit samples, so fresh and resumed runs agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from visalign import rewards as rewards_lib
from visalign.eval.stats import bootstrap_mean_ci, paired_delta
from visalign.media import save_pixels, to_uint8
from visalign.models.base import FlowModelAdapter, encode
from visalign.prompts import Prompt, check_prompt_spec, prompt_source, prompts_of, source_images
from visalign.rewards.base import combined
from visalign.rewards.registry import SERVICES
from visalign.sampling import sample
from visalign.suggest import did_you_mean

PRESETS: dict[str, list[str]] = {
    "preference": ["pickscore", "hpsv2.1", "imagereward", "aesthetic"],
    "geneval": ["concepts-detector"],
    "compbench": ["concepts-vqa"],
    "vbench": ["video-flicker", "video-subject-consistency", "video-background-consistency",
               "video-dynamic-degree", "video-motion-smoothness"],
    "world-rewards": ["world-verifier", "world-strict", "world-cleanliness", "saturation"],
}
# A preset's prompts when `prompts` is not given; DEFAULT_PROMPTS for the others.
PRESET_PROMPTS: dict[str, str] = {"geneval": "geneval:test", "compbench": "geneval:test:color_attr,position"}
DEFAULT_PROMPTS = "world:heldout"


@dataclass
class RewardEvalConfig:
    """`visalign eval --suite rewards|preference|geneval|compbench|vbench|world-rewards`."""

    prompts: str | None = field(default=None, metadata={
        "help": ".txt, .jsonl, a shipped set (geneval:test, ocr:test) or world:SPLIT[:TEMPLATES] (default: the "
                "preset's set, geneval:test for geneval; else world:heldout)"})
    rewards: list[str] = field(default_factory=list, metadata={"help": "reward names (default: the preset's)"})
    reward_options: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "keyword arguments per reward, e.g. {pickscore: {model: /path/to/PickScore}}"})
    model: str = field(default="world", metadata={"help": "registered model name or dotted path"})
    model_path: str | None = field(default=None, metadata={"help": "checkpoint (default: the model's own)"})
    lora: str | None = field(default=None, metadata={"help": "LoRA to load before evaluating"})
    out: str = field(default="outputs/eval_rewards", metadata={"help": "directory: samples, scores, tables, grid"})
    n_per_template: int = field(default=16, metadata={"ge": 1, "help": "world prompts per template"})
    max_prompts: int | None = field(default=None, metadata={"ge": 1,
        "help": "use only the first N prompts of the file"})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"ge": 0, "help": "one sample per prompt per seed"})
    steps: int = field(default=20, metadata={"ge": 1, "help": "sampling steps"})
    guidance: float = field(default=3.0, metadata={"ge": 0, "help": "CFG scale"})
    height: int | None = field(default=None, metadata={"ge": 1, "help": "default: 32 for the world, else 512"})
    width: int | None = field(default=None, metadata={"ge": 1, "help": "default: as height"})
    num_frames: int | None = field(default=None, metadata={"ge": 1, "help": "frames for video models"})
    batch_size: int = field(default=16, metadata={"ge": 1, "help": "samples per sampling batch"})
    level: float = field(default=0.95, metadata={"gt": 0, "lt": 1, "help": "confidence level of the intervals"})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "comparison mode: 'base', a checkpoint path or lora:DIR per entry; paired deltas vs the first"})

    def __post_init__(self):
        for name in ("n_per_template", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds} must be a non-empty list of distinct integers")
        if not 0 < self.level < 1:
            raise ValueError(f"level={self.level} must be in (0, 1)")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance} must be >= 0")
        if len(set(self.compare)) != len(self.compare):
            raise ValueError(f"compare entries must be distinct, got {self.compare}")
        if self.prompts is not None:
            check_prompt_spec(self.prompts, "prompts")

        for name in self.rewards:
            if name not in rewards_lib.REGISTRY and "." not in name and not name.startswith(tuple(SERVICES)):
                raise ValueError(f"unknown reward {name!r}{did_you_mean(name, rewards_lib.list_rewards())}; "
                                 f"allowed: {', '.join(rewards_lib.list_rewards())}")
            if rewards_lib.describe(name)["groupwise"]:  # the suite scores and resumes sample by sample
                raise ValueError(f"rewards: {name} scores groups of samples as sets (groupwise); this suite scores "
                                 "samples one by one. Log it during training (eval_rewards) instead")
        unknown = [k for k in self.reward_options if k not in self.rewards]
        if unknown:
            raise ValueError(f"reward_options for {unknown}, which are not in rewards {self.rewards}")


def with_preset(cfg: RewardEvalConfig, suite: str) -> RewardEvalConfig:
    """The config with what the user left out filled from a preset suite: its rewards, its prompts
    (`PRESET_PROMPTS`, else `DEFAULT_PROMPTS`)."""
    rewards = cfg.rewards or list(PRESETS.get(suite, []))
    return replace(cfg, rewards=rewards, prompts=cfg.prompts or PRESET_PROMPTS.get(suite, DEFAULT_PROMPTS))


def load_prompts(source: str, n_per_template: int = 16, max_prompts: int | None = None) -> list[Prompt]:
    """Prompts in a fixed order: a source's `fixed` list (`visalign.prompts`), n per template for generated
    sources, cut to `max_prompts`."""
    items = prompts_of(prompt_source(source).fixed(n_per_template), f"prompts={source!r}")
    items = items[:max_prompts] if max_prompts is not None else items
    if not items:
        raise ValueError(f"no prompts in {source!r}")
    return items


def sample_key(index: int, seed: int) -> str:
    return f"p{index:05d}_s{seed}"


def sample_seed(index: int, seed: int) -> int:
    """Each (prompt, seed) has its own noise seed, so results do not depend on batching or on what is cached."""
    return seed * 1_000_003 + index


@torch.no_grad()
def generate_missing(adapter: FlowModelAdapter, items: list[Prompt], cfg: RewardEvalConfig, sample_dir: Path,
                     progress: bool = True) -> int:
    """Generate and store every (prompt, seed) sample not yet in `sample_dir`; returns how many were made."""

    todo = [(i, s) for s in cfg.seeds for i in range(len(items))
            if not (sample_dir / f"{sample_key(i, s)}.safetensors").exists()]
    sample_dir.mkdir(parents=True, exist_ok=True)
    height = cfg.height or adapter.default_size
    width = cfg.width or height
    adapter.check_request(height, width, cfg.num_frames)
    for start in tqdm(range(0, len(todo), cfg.batch_size), desc="sampling", disable=not progress):
        chunk = todo[start:start + cfg.batch_size]
        chunk_items = [items[i] for i, _ in chunk]
        cond = encode(adapter, [it.text for it in chunk_items], cfg=adapter.guidance == "cfg" and cfg.guidance > 1,
                      images=source_images(chunk_items, (height, width)))
        traj = sample(adapter, cond, num_steps=cfg.steps, height=height, width=width, num_frames=cfg.num_frames,
                      guidance_scale=cfg.guidance, seeds=[sample_seed(i, s) for i, s in chunk])
        pixels = torch.from_numpy(to_uint8(adapter.decode(traj.final)))
        for (i, s), px in zip(chunk, pixels, strict=True):
            tmp = sample_dir / f"{sample_key(i, s)}.tmp"
            save_file({"pixels": px.contiguous()}, str(tmp))
            tmp.rename(sample_dir / f"{sample_key(i, s)}.safetensors")  # a killed run leaves no half-written sample
    return len(todo)


def read_scores(path: Path) -> dict[tuple[str, str], float]:
    """{(sample key, reward): score} from scores.jsonl; a truncated last line (killed run) is ignored."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[(row["key"], row["reward"])] = row["score"]
    return out


def score_missing(items: list[Prompt], cfg: RewardEvalConfig, names: list[str], sample_dir: Path, score_path: Path,
                  progress: bool = True) -> int:
    """Score every (sample, reward) pair not yet in scores.jsonl; returns how many scores were computed."""

    done = read_scores(score_path)
    if score_path.exists() and score_path.stat().st_size and not score_path.read_bytes().endswith(b"\n"):
        with score_path.open("a") as f:  # a killed run's half line: end it so new rows start on their own line
            f.write("\n")
    computed = 0
    keys = [(i, s) for s in cfg.seeds for i in range(len(items))]
    for name in names:
        todo = [(i, s) for i, s in keys if (sample_key(i, s), name) not in done]
        if not todo:
            continue
        reward = rewards_lib.load(name, **cfg.reward_options.get(name, {}))
        with score_path.open("a") as f:
            for start in tqdm(range(0, len(todo), cfg.batch_size), desc=f"scoring {name}", disable=not progress):
                chunk = todo[start:start + cfg.batch_size]
                pixels = torch.stack([load_file(str(sample_dir / f"{sample_key(i, s)}.safetensors"))["pixels"]
                                      for i, s in chunk]).float() / 255
                media = {"videos": pixels} if pixels.ndim == 5 else {"images": pixels}
                metadata = [dict(items[i].metadata) for i, _ in chunk]
                with torch.no_grad():
                    scores = combined(reward(prompts=[items[i].text for i, _ in chunk], metadata=metadata,
                                             **media)).float().tolist()
                for (i, s), value in zip(chunk, scores, strict=True):
                    f.write(json.dumps({"key": sample_key(i, s), "reward": name, "score": value}) + "\n")
                computed += len(chunk)
    return computed


def summarise(items: list[Prompt], cfg: RewardEvalConfig, names: list[str], scores: dict) -> dict:
    """Per reward: overall and per-category means with bootstrap intervals over samples, per-seed means and their
    spread across seeds, and the per-sample values (for comparison mode)."""
    out = {}
    categories = list(dict.fromkeys(it.category for it in items))
    for name in names:
        values = {(i, s): scores[(sample_key(i, s), name)] for s in cfg.seeds for i in range(len(items))}
        flat = torch.tensor(list(values.values()), dtype=torch.float64)
        mean, low, high = bootstrap_mean_ci(flat, level=cfg.level)
        per_seed = [float(torch.tensor([values[(i, s)] for i in range(len(items))]).mean()) for s in cfg.seeds]
        row = {"mean": mean, "low": low, "high": high, "n": len(flat), "per_seed": per_seed,
               "seed_std": float(torch.tensor(per_seed).std()) if len(per_seed) > 1 else 0.0, "categories": {},
               "per_sample": {sample_key(i, s): v for (i, s), v in values.items()}}
        for c in categories:
            sub = [values[(i, s)] for s in cfg.seeds for i, it in enumerate(items) if it.category == c]
            m, lo, hi = bootstrap_mean_ci(sub, level=cfg.level)
            row["categories"][c] = {"mean": m, "low": lo, "high": hi, "n": len(sub)}
        out[name] = row
    return out


def markdown_table(results: dict, level: float) -> str:
    pct = round(level * 100)
    rows = [f"| reward | category | mean | {pct}% CI | n | spread across seeds |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | **overall** | {r['mean']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] | {r['n']} | "
                    f"{r['seed_std']:.4f} |")
        if len(r["categories"]) > 1:
            for c, v in r["categories"].items():
                rows.append(f"| {name} | {c} | {v['mean']:.4f} | [{v['low']:.4f}, {v['high']:.4f}] | {v['n']} | |")
    return "\n".join(rows) + "\n"


def evaluate_rewards(adapter: FlowModelAdapter, cfg: RewardEvalConfig, progress: bool = True) -> dict:
    """Run (or resume) the suite for one model; writes samples/, scores.jsonl, results.json/.md and grid.png."""

    if not cfg.rewards:
        raise ValueError("no rewards to evaluate: set rewards (or use a preset suite)")
    if cfg.prompts is None:
        cfg = replace(cfg, prompts=DEFAULT_PROMPTS)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # What fixes each sample's content; seeds, prompt count, rewards and batching may change between resumed runs.
    manifest = {k: v for k, v in asdict(cfg).items()
                if k in ("prompts", "model", "model_path", "lora", "n_per_template", "steps", "guidance", "height",
                         "width", "num_frames")}
    manifest_path = out / "suite.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()) != json.loads(json.dumps(manifest)):
        raise ValueError(f"{out} holds an evaluation with different settings ({manifest_path}); use another out "
                         "directory or delete it")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    items = load_prompts(cfg.prompts, cfg.n_per_template, cfg.max_prompts)
    sample_dir = out / "samples"
    generated = generate_missing(adapter, items, cfg, sample_dir, progress)
    computed = score_missing(items, cfg, cfg.rewards, sample_dir, out / "scores.jsonl", progress)
    results = summarise(items, cfg, cfg.rewards, read_scores(out / "scores.jsonl"))
    results["_run"] = {"generated": generated, "scored": computed, "prompts": len(items), "seeds": cfg.seeds}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "results.md").write_text(markdown_table(table, cfg.level))
    picks = [sample_key(i, cfg.seeds[0]) for i in range(min(16, len(items)))]
    grid = torch.stack([load_file(str(sample_dir / f"{k}.safetensors"))["pixels"] for k in picks]).float() / 255
    save_pixels(grid, out / "grid.png", scale=max(1, 96 // grid.shape[-1]))  # small renders enlarged
    return results


def compare_rewards(results: dict[str, dict], level: float = 0.95) -> dict:
    """Paired deltas of every entry against the first, per reward, over the shared (prompt, seed) samples."""
    names = list(results)
    base = results[names[0]]
    out = {}
    for name in names[1:]:
        out[name] = {}
        for reward, r in results[name].items():
            if reward.startswith("_"):
                continue
            a, b = base[reward]["per_sample"], r["per_sample"]
            if a.keys() != b.keys():
                raise ValueError(f"{name} and {names[0]} were not evaluated on the same samples")
            keys = sorted(a)
            out[name][reward] = paired_delta([a[k] for k in keys], [b[k] for k in keys], level=level)
    return out


def comparison_table(results: dict[str, dict], deltas: dict, level: float) -> str:
    names = list(results)
    rewards = [k for k in results[names[0]] if not k.startswith("_")]
    pct = round(level * 100)
    rows = ["| reward | " + " | ".join(names) + " | " +
            " | ".join(f"Δ {n} ({pct}% CI) | wins" for n in names[1:]) + " |",
            "|---|" + "---|" * (len(names) + 2 * (len(names) - 1))]
    for reward in rewards:
        cells = [f"{results[n][reward]['mean']:.4f}" for n in names]
        for n in names[1:]:
            d = deltas[n][reward]
            cells += [f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]", f"{d['wins']:.2f}"]
        rows.append(f"| {reward} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
