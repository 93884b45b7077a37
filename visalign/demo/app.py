"""The comparison demo: base, aligned checkpoints and a steered run side by side, with per-reward scores.

    .venv/bin/visalign demo                                      # the built-in world model, offline
    .venv/bin/visalign demo --checkpoint nft=runs/nft_world/final/model.safetensors --runs runs

Tabs: Compare (same prompt and seeds in every column; a gallery of all samples, a slider for the first pair, a
score table with the world's per-concept verdicts, a bar chart of mean rewards and which column wins each
reward), FK particles (lineage, ESS and the decoded x0-predictions of the steered column when it uses FK), and
Training run (reward curves, trained vs held-out, sample grids over time, the hacking alarm).

The functions behind the buttons are plain methods of `Demo` (the tests call them directly and through
`gradio_client`); the API names are /generate, /compare, /score and /run_view. Outputs are 8-bit images and the
scores are computed on exactly those images.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visalign import rewards as rewards_lib
from visalign.config import check_ranges
from visalign.media import to_uint8
from visalign.models import load_model
from visalign.rewards.base import combined
from visalign.sampling import sample
from visalign.steering import steer
from visalign.world.grammar import parse_prompt
from visalign.world.verify import verify

# gradio, pandas and matplotlib are imported where the page is built or a table drawn: the demo extra
# installs them, and the rest of visalign does not need them.

STEER_METHODS = ("none", "best_of_n", "fk", "guidance")


@dataclass
class DemoConfig:
    model: str = "world"
    model_path: str | None = None
    checkpoints: dict[str, str] = field(default_factory=dict)  # label -> checkpoint path or lora:DIR
    rewards: list[str] = field(default_factory=lambda: ["world-verifier", "world-strict", "world-cleanliness",
                                                        "saturation"])
    steer_rewards: dict[str, float] | None = None  # best-of-N / FK (default: world-verifier, else the first reward)
    guidance_rewards: dict[str, float] | None = None  # gradient guidance (default: world-soft, else the first
    # differentiable reward of `rewards`)
    runs_dir: str | None = None
    max_steps: int = field(default=50, metadata={"ge": 1, "help": "most sampling steps a request may ask"})
    max_samples: int = field(default=8, metadata={"ge": 1, "help": "most samples (seeds) per request"})
    max_particles: int = field(default=8, metadata={"ge": 1, "help": "most FK particles / best-of-N candidates"})
    max_prompt_chars: int = field(default=500, metadata={"ge": 1, "help": "longest prompt accepted"})
    max_upload_mb: float = field(default=10.0, metadata={
        "gt": 0, "help": "largest upload; gradio enforces it before storing the file, the scorer again"})
    max_pixels: int = field(default=1024 * 1024, metadata={
        "ge": 1, "help": "width x height of an uploaded image, read from its header before decoding"})

    def __post_init__(self):
        for label, path in self.checkpoints.items():
            if label in ("base", "steered") or not label:
                raise ValueError(f"checkpoint label {label!r} is reserved or empty")
            target = path.removeprefix("lora:")
            if not Path(target).exists():
                raise ValueError(f"checkpoint {label}={path}: no such file or directory")
        if self.runs_dir is not None and not Path(self.runs_dir).is_dir():
            raise ValueError(f"runs directory {self.runs_dir!r} does not exist")
        if not self.rewards:
            raise ValueError("the demo needs at least one reward")
        check_ranges(self)

        world = self.model == "world"
        if self.steer_rewards is None:
            self.steer_rewards = {"world-verifier": 1.0} if world else {self.rewards[0]: 1.0}
        if self.guidance_rewards is None:
            differentiable = [r for r in self.rewards if rewards_lib.describe(r)["differentiable"]]
            self.guidance_rewards = {"world-soft": 1.0} if world else ({differentiable[0]: 1.0} if differentiable
                                                                        else {})


class DemoError(ValueError):
    """Bad input from the page; shown as a message (gr.Error), never a traceback."""


MAX_SEED = 2**31 - 1


def _excerpt(text: str, n: int = 60) -> str:
    """A prompt as it may appear in a message or a log: never whole when long."""
    return repr(text if len(text) <= n else text[:n] + f"… ({len(text)} characters)")


def _quantise(pixels: torch.Tensor) -> torch.Tensor:
    """8-bit images as float in [0, 1]: what the page shows is exactly what is scored."""

    return torch.from_numpy(to_uint8(pixels)).float() / 255


def _pil(pixels: torch.Tensor, scale: int):
    img = Image.fromarray(to_uint8(pixels.permute(1, 2, 0)))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def concept_text(verdicts: dict[str, bool]) -> str:
    """The verifier's verdicts, one group per object: "red circle: object ✓ color ✗; relation ✓; no_extra ✓"."""
    parts: dict[str, str] = {}
    for key, ok in verdicts.items():
        mark = "✓" if ok else "✗"
        head, _, check = key.rpartition("/")
        if head:
            parts[head] = f"{parts[head]} {check} {mark}" if head in parts else f"{head}: {check} {mark}"
        else:
            parts[key] = f"{key} {mark}"
    return "; ".join(parts.values())


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.base = load_model(cfg.model, cfg.model_path)
        self._aligned: dict[str, object] = {}
        for label in cfg.checkpoints:  # a checkpoint that cannot load fails at start, not at the first Compare
            self.adapter(label)
        self.scale = 4 if self.base.name == "world" else 1
        self.default_size = self.base.default_size

    # ---- models ------------------------------------------------------------------------------------------
    def adapter(self, label: str):
        if label == "base":
            return self.base
        if label not in self.cfg.checkpoints:
            raise DemoError(f"unknown checkpoint {label!r}; configured: {', '.join(self.cfg.checkpoints) or 'none'}")
        if label not in self._aligned:
            path = self.cfg.checkpoints[label]
            if path.startswith("lora:"):
                adapter = load_model(self.cfg.model, self.cfg.model_path)
                adapter.load_lora(path[len("lora:"):])
            else:
                adapter = load_model(self.cfg.model, path)
            self._aligned[label] = adapter
        return self._aligned[label]

    # ---- validation --------------------------------------------------------------------------------------
    def check(self, prompt: str, steps: int, guidance: float, size: int, n: int, seed=0) -> tuple[str, int, int]:
        prompt = self.check_prompt(prompt)
        self.check_seed(seed, n)
        steps, n, size = int(steps), int(n), int(size)
        if not 1 <= steps <= self.cfg.max_steps:
            raise DemoError(f"steps must be between 1 and {self.cfg.max_steps}, got {steps}")
        if not 1 <= n <= self.cfg.max_samples:
            raise DemoError(f"samples must be between 1 and {self.cfg.max_samples}, got {n}")
        if not 0 <= float(guidance) <= 20:
            raise DemoError(f"guidance must be between 0 and 20, got {guidance}")
        try:
            self.base.check_request(size, size)
        except ValueError as err:
            raise DemoError(str(err)) from None
        return prompt, steps, n

    def check_prompt(self, prompt) -> str:
        """A non-empty prompt of at most max_prompt_chars that the model's text encoder can read."""
        prompt = (prompt if isinstance(prompt, str) else "").strip()
        if not prompt:
            raise DemoError("enter a prompt")
        if len(prompt) > self.cfg.max_prompt_chars:
            raise DemoError(f"the prompt has {len(prompt)} characters; at most {self.cfg.max_prompt_chars}")
        try:
            self.base.check_prompts([prompt])
        except ValueError as err:  # e.g. words outside the world's vocabulary
            raise DemoError(f"the model cannot read this prompt: {err}") from None
        return prompt

    def check_seed(self, seed, n: int = 1) -> int:
        """An integer in [0, MAX_SEED - n + 1]: the samples use seed .. seed + n - 1, all distinct and in range
        (torch reduces larger seeds modulo 2^63, so 2^63 would silently be seed 0)."""
        try:
            value = float(seed)
        except (TypeError, ValueError):
            raise DemoError(f"seed must be a whole number, got {_excerpt(str(seed))}") from None
        top = MAX_SEED - max(int(n), 1) + 1
        if not value.is_integer() or not 0 <= value <= top:
            raise DemoError(f"seed must be a whole number between 0 and {top}, got {_excerpt(str(seed), 30)}")
        return int(value)

    # ---- generation and scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, label: str, prompt: str, seed: int, steps: int, guidance: float, size: int, n: int):
        adapter = self.adapter(label)
        cond = adapter.encode_prompts([prompt], cfg=guidance > 1).repeat_interleave(n)  # encode once
        traj = sample(adapter, cond, num_steps=steps, height=size, width=size, guidance_scale=guidance,
                      seeds=[int(seed) + j for j in range(n)])
        return _quantise(adapter.decode(traj.final).float().cpu())

    def steered(self, prompt, seed, steps, guidance, size, n, method, k, lam):
        if method == "guidance":
            if not self.cfg.guidance_rewards:
                raise DemoError("guidance needs a differentiable reward among the demo's rewards")
            rewards, options = self.cfg.guidance_rewards, {"scale": float(lam)}
        else:
            rewards = self.cfg.steer_rewards
            # the demo shows FK's best particle: "max" potentials, chosen for reward (see FKSteering)
            options = {"n": int(k)} if method == "best_of_n" else {"k": int(k), "lam": float(lam), "every": 4,
                                                                  "potential": "max", "keep_x0": True}
        if method in ("best_of_n", "fk") and not 1 <= int(k) <= self.cfg.max_particles:
            raise DemoError(f"particles / candidates must be between 1 and {self.cfg.max_particles}")
        out = steer(self.base, [prompt] * n, rewards, method, steps=steps, guidance=guidance, height=size,
                    width=size, seed=int(seed), **options)
        return _quantise(out.images.float().cpu()), out.report

    def score_table(self, columns: dict[str, torch.Tensor], prompt: str, rewards: list[str]):
        """Rows: one per (column, sample) with every selected reward, and the world's per-concept verdicts."""
        import pandas as pd

        specs = None
        if self.base.name == "world":
            try:
                specs = parse_prompt(prompt)
            except ValueError:
                specs = None
        rows = []
        for label, images in columns.items():
            scores = {}
            for name in rewards:
                reward = rewards_lib.load(name)
                scores[name] = combined(reward(prompts=[prompt] * len(images), images=images)).float().tolist()
            verdicts = None
            if specs is not None:
                verdicts = verify(images, [specs] * len(images)).concepts
            for j in range(len(images)):
                row = {"column": label, "sample": j, **{name: round(scores[name][j], 4) for name in rewards}}
                if verdicts is not None:
                    row["concepts"] = concept_text(verdicts[j])
                rows.append(row)
        table = pd.DataFrame(rows)
        means = table.groupby("column", sort=False)[list(rewards)].mean().reset_index()
        bars = means.melt(id_vars="column", var_name="reward", value_name="mean")
        bars["reward · column"] = bars["reward"] + " · " + bars["column"]  # one bar each, coloured by column
        winners = pd.DataFrame([{"reward": name, "winner": means.loc[means[name].idxmax(), "column"],
                                 "best mean": round(float(means[name].max()), 4)} for name in rewards])
        return table, bars, winners

    def compare(self, prompt, seed, steps, guidance, size, n, aligned, method, k, lam, rewards):
        """Every column on the same prompt and seeds; returns the page's outputs (see `build_app`)."""
        prompt, steps, n = self.check(prompt, steps, guidance, size, n, seed)
        size, seed, guidance = int(size), int(seed), float(guidance)
        if method not in STEER_METHODS:
            raise DemoError(f"steering method must be one of {', '.join(STEER_METHODS)}")
        rewards = list(rewards or [])
        unknown = [r for r in rewards if r not in self.cfg.rewards]
        if not rewards or unknown:
            raise DemoError(f"choose rewards among {', '.join(self.cfg.rewards)}")
        columns = {"base": self.samples("base", prompt, seed, steps, guidance, size, n)}
        for label in aligned or []:
            columns[label] = self.samples(label, prompt, seed, steps, guidance, size, n)
        report = None
        if method != "none":
            columns[f"steered ({method})"], report = self.steered(prompt, seed, steps, guidance, size, n, method,
                                                                  k, lam)
        table, bars, winners = self.score_table(columns, prompt, rewards)
        gallery = [(_pil(img, self.scale), f"{label} · seed {seed + j}") for label, imgs in columns.items()
                   for j, img in enumerate(imgs)]
        labels = list(columns)
        # base against the first aligned checkpoint shown, else against the steered column
        right = next((label for label in labels[1:] if label in self.cfg.checkpoints), labels[-1])
        slider = (_pil(columns[labels[0]][0], self.scale), _pil(columns[right][0], self.scale))
        lineage_fig, x0_gallery, ess = self.fk_view(report)
        return gallery, slider, table, bars, winners, lineage_fig, x0_gallery, ess

    def generate(self, prompt, seed, steps, guidance, size, n):
        prompt, steps, n = self.check(prompt, steps, guidance, size, n, seed)
        imgs = self.samples("base", prompt, int(seed), steps, float(guidance), int(size), n)
        return [(_pil(img, self.scale), f"base · seed {int(seed) + j}") for j, img in enumerate(imgs)]

    def read_upload(self, image) -> torch.Tensor:
        """An uploaded image as [1, 3, H, W] in [0, 1]: a file path (the page's upload) or an HWC uint8 array.
        A file's size and its header's width x height are checked before any pixel is decoded, so a small file
        that would decode to gigabytes (a 6000 x 6000 PNG is 117 KB) is refused cheaply."""
        if image is None:
            raise DemoError("upload an image")
        if isinstance(image, (str, Path)):
            path = Path(image)
            size = path.stat().st_size
            if size > self.cfg.max_upload_mb * 2**20:
                raise DemoError(f"the file is {size / 2**20:.1f} MB; at most {self.cfg.max_upload_mb:g} MB")
            try:
                with Image.open(path) as im:  # reads the header only
                    self._check_pixels(*im.size)
                    image = np.asarray(im.convert("RGB"))
            except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as err:
                if isinstance(err, DemoError):
                    raise
                raise DemoError("the upload is not an image this demo can read (PNG, JPEG, WebP, BMP or GIF)") \
                    from None
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise DemoError(f"expected an image of height x width x channels, got shape {image.shape}")
        self._check_pixels(image.shape[1], image.shape[0])
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return torch.as_tensor(image[..., :3]).float().permute(2, 0, 1)[None] / 255

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.cfg.max_pixels:
            raise DemoError(f"the image is {width} x {height} = {width * height:,} pixels; at most "
                            f"{self.cfg.max_pixels:,} (e.g. {int(self.cfg.max_pixels ** 0.5)} x "
                            f"{int(self.cfg.max_pixels ** 0.5)})")

    def score(self, image, prompt, rewards):
        """Score an uploaded image (a file path, or an HWC uint8 array) with the selected rewards."""
        import pandas as pd

        rewards = list(rewards or [])
        if not rewards or any(r not in self.cfg.rewards for r in rewards):
            raise DemoError(f"choose rewards among {', '.join(self.cfg.rewards)}")
        prompt = prompt if isinstance(prompt, str) else ""
        if len(prompt) > self.cfg.max_prompt_chars:
            raise DemoError(f"the prompt has {len(prompt)} characters; at most {self.cfg.max_prompt_chars}")
        x = self.read_upload(image)
        return pd.DataFrame([{"reward": name, "score": round(float(combined(rewards_lib.load(name)(
            prompts=[prompt or ""], images=x))[0]), 4)} for name in rewards])

    # ---- FK view -----------------------------------------------------------------------------------------
    def fk_view(self, report):
        """Lineage plot (which particle each slot descends from at every resampling), x0-predictions, ESS."""
        import pandas as pd

        if not report or report.get("method") != "fk":
            return None, [], pd.DataFrame(columns=["step", "prompt", "ess"])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = report["k"]
        fig, ax = plt.subplots(figsize=(7, 2.8))
        events = report["lineage"]
        for e_i, event in enumerate(events):
            for slot, parent in enumerate(event["ancestors"][0]):
                ax.plot([e_i, e_i + 1], [parent, slot], color="tab:blue", alpha=0.6)
        ax.set(xlabel="resampling event (step)", ylabel="particle", yticks=range(k),
               xticks=range(len(events) + 1), xticklabels=["start"] + [str(e["step"]) for e in events],
               title="FK lineage, first prompt: lines join each particle to its ancestor")
        fig.tight_layout()
        x0 = [(_pil(img, self.scale), f"step {step} · particle {p}") for step, imgs in report.get("x0_images", [])
              for p, img in enumerate(imgs[:k])]
        ess = pd.DataFrame([{"step": e["step"], "prompt": p, "ess": round(v, 3)} for e in report["ess"]
                            for p, v in enumerate(e["ess"])])
        return fig, x0, ess

    # ---- training-run view -------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        if self.cfg.runs_dir is None:
            return []
        root = Path(self.cfg.runs_dir)
        return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("metrics.jsonl"))

    def run_dir(self, name: str) -> Path:
        if self.cfg.runs_dir is None:
            raise DemoError("no runs directory configured (visalign demo --runs DIR)")
        root = Path(self.cfg.runs_dir).resolve()
        path = (root / (name or "")).resolve()
        if root != path and root not in path.parents:
            raise DemoError("runs must be inside the configured runs directory")
        if not (path / "metrics.jsonl").exists():
            raise DemoError(f"{name!r} is not a training run (no metrics.jsonl)")
        return path

    def run_view(self, name):
        """Reward curves (trained rollouts, held-out rollouts, evaluations), sample grids over time, alarms."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = self.run_dir(name)
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        keys = sorted({k for r in rows for k in r if k.endswith("/mean") and (k.startswith(("rewards/", "heldout/",
                                                                                          "eval/")))})
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            style = "-" if key.startswith("rewards/") else ("--" if key.startswith("heldout/") else "o:")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=key.removesuffix("/mean"))
        ax.set(xlabel="step", ylabel="mean reward", title=f"{name}: trained (solid), held-out (dashed), eval (dots)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        grids = [(str(p), p.stem) for p in sorted((path / "samples").glob("step_*.png"))]
        alarms = path / "alarms.jsonl"
        alarm = "\n".join(json.loads(line)["message"] for line in alarms.read_text().splitlines() if line.strip()) \
            if alarms.exists() else "no alarm"
        return fig, grids, alarm


def build_app(demo: Demo, autorun: bool = False):
    """The Gradio Blocks app. `autorun` runs one comparison with the default inputs when the page loads (the
    browser test and the README screenshot use it)."""
    import gradio as gr
    import pandas as pd

    def guarded(fn):
        """For API clients: bad input is an error carrying the message (and no traceback in the log)."""
        def call(*args):
            try:
                return fn(*args)
            except DemoError as err:
                raise gr.Error(str(err), print_exception=False) from None
        call.__name__ = fn.__name__
        return call

    def shown(fn, n_outputs: int):
        """For the page: bad input becomes a message under the inputs (the other outputs stay as they were)."""
        def call(*args):
            try:
                out = fn(*args)
            except DemoError as err:
                return (*[gr.update()] * n_outputs, gr.update(value=f"**Cannot run this:** {err}", visible=True))
            return (*(out if n_outputs > 1 else (out,)), gr.update(value="", visible=False))
        call.__name__ = f"{fn.__name__}_in_page"
        return call

    def compare_rows(*args):
        """On the page each column of the comparison is one row of the gallery (n seeds wide), so the
        captions have room and base / aligned / steered line up seed by seed."""
        gallery, slider, table, *rest = demo.compare(*args)
        rewards = [c for c in table.columns if c not in ("column", "sample", "concepts")]
        widths = ["13%", "7%", *[f"{40 / max(1, len(rewards)):.0f}%"] * len(rewards)]
        widths += ["40%"] if "concepts" in table.columns else []  # wide enough to wrap, never cut off
        per_row = max(1, min(len(gallery), int(args[5])))
        return (gr.Gallery(value=gallery, columns=per_row, height="fit-content"), slider,
                gr.Dataframe(value=table, column_widths=widths, max_height=80 * (len(table) + 1)), *rest)

    cfg = demo.cfg
    aligned_labels = list(cfg.checkpoints)
    with gr.Blocks(title="visalign demo") as app:
        gr.Markdown("# visalign: base vs aligned vs steered\nSame prompt and seeds in every column; scores are "
                    "computed on the 8-bit images shown.")
        with gr.Tab("Compare"):
            with gr.Row():
                prompt = gr.Textbox(value="a red circle to the left of a blue square", label="prompt", scale=3)
                seed = gr.Number(value=0, precision=0, label="seed")
                steps = gr.Slider(1, cfg.max_steps, value=20, step=1, label="steps", min_width=220)
                guidance = gr.Slider(0, 10, value=3.0, step=0.5, label="guidance (CFG)", min_width=220)
                size = gr.Number(value=demo.default_size, precision=0, label="image size")
                n = gr.Slider(1, cfg.max_samples, value=4, step=1, label="samples (seeds)", min_width=220)
            with gr.Row():
                aligned = gr.CheckboxGroup(aligned_labels, value=aligned_labels, label="aligned checkpoints",
                                           info=None if aligned_labels else "none loaded: start the demo with "
                                           "--checkpoint LABEL=PATH or --lora LABEL=DIR")
                method = gr.Dropdown(list(STEER_METHODS), value="fk", label="steering")
                k = gr.Slider(1, cfg.max_particles, value=4, step=1, label="particles / candidates (FK, best-of-N)",
                              min_width=220)
                lam = gr.Slider(0, 20, value=10, step=0.5, label="FK λ / guidance scale", min_width=220)
                rewards = gr.CheckboxGroup(cfg.rewards, value=cfg.rewards, label="rewards to score")
            with gr.Row():
                run = gr.Button("Compare", variant="primary")
                gen = gr.Button("Generate (base only)")
            message = gr.Markdown(visible=False, elem_id="compare-message")
            # PNG, not the default WebP: the images served are exactly the 8-bit images that were scored.
            gallery = gr.Gallery(label="samples (column · seed)", columns=cfg.max_samples, format="png",
                                 height="fit-content")  # gradio's "auto" caps it at 55% of the window
            slider = gr.ImageSlider(label="first sample: base vs the first aligned checkpoint (else the steered "
                                          "column)", format="png")
            table = gr.Dataframe(label="per-sample rewards and per-concept verdicts (click Compare)", wrap=True,
                                 value=pd.DataFrame(columns=["column", "sample", *cfg.rewards]))
            with gr.Row():
                bars = gr.BarPlot(x="reward · column", y="mean", color="column", label="mean reward per column",
                                  x_label_angle=-30)
                winners = gr.Dataframe(label="which column wins each reward", wrap=True,
                                       value=pd.DataFrame(columns=["reward", "winner", "best mean"]))
        with gr.Tab("FK particles"):
            lineage = gr.Plot(label="lineage")
            x0 = gr.Gallery(label="decoded x0-predictions at resampling steps (first prompt)", columns=8,
                            format="png")
            ess = gr.Dataframe(label="effective sample size per resampling step (after a Compare with fk)",
                               value=pd.DataFrame(columns=["step", "prompt", "ess"]))
        with gr.Tab("Score an image"):
            # A file, not gr.Image: gradio would open (and for some modes decode) the image before `score` could
            # check its size, and a file that is no image would fail there with a message naming no cause.
            upload = gr.File(file_types=["image"], type="filepath", label=f"image (at most {cfg.max_upload_mb:g} "
                                                                          f"MB and {cfg.max_pixels:,} pixels)")
            upload_prompt = gr.Textbox(label="prompt")
            upload_rewards = gr.CheckboxGroup(cfg.rewards, value=cfg.rewards, label="rewards")
            score_btn = gr.Button("Score")
            score_message = gr.Markdown(visible=False, elem_id="score-message")
            scores = gr.Dataframe(label="scores", value=pd.DataFrame(columns=["reward", "score"]))
        with gr.Tab("Training run"):
            run_name = gr.Dropdown(demo.runs(), label=f"run under {cfg.runs_dir or '(none configured)'}")
            curves = gr.Plot(label="reward curves")
            grids = gr.Gallery(label="evaluation samples over time", columns=4)
            alarm = gr.Textbox(label="hacking alarm")
        inputs = [prompt, seed, steps, guidance, size, n, aligned, method, k, lam, rewards]
        outputs = [gallery, slider, table, bars, winners, lineage, x0, ess]
        gen_inputs, score_inputs = [prompt, seed, steps, guidance, size, n], [upload, upload_prompt, upload_rewards]
        # The page's buttons show bad input as a message next to the inputs; the API endpoints (same functions,
        # on buttons the page never shows) answer it with an error, as API clients expect.
        run.click(shown(compare_rows, len(outputs)), inputs, [*outputs, message], api_visibility="private")
        gen.click(shown(demo.generate, 1), gen_inputs, [gallery, message], api_visibility="private")
        score_btn.click(shown(demo.score, 1), score_inputs, [scores, score_message], api_visibility="private")
        api = gr.Button(visible=False)
        api.click(guarded(demo.compare), inputs, outputs, api_name="compare")
        api.click(guarded(demo.generate), gen_inputs, gallery, api_name="generate")
        api.click(guarded(demo.score), score_inputs, scores, api_name="score")
        run_name.change(guarded(demo.run_view), run_name, [curves, grids, alarm], api_name="run_view")
        if autorun:
            app.load(shown(compare_rows, len(outputs)), inputs, [*outputs, message])
    return app


def wait_idle(app, timeout: float = 120.0) -> bool:
    """Wait until the app's queue runs no job (before closing it: a job cut off at interpreter exit aborts the
    process). True when idle; reads gradio's queue state, so on an unknown gradio layout it returns at once."""

    queue = getattr(app, "_queue", None)
    if queue is None or not hasattr(queue, "active_jobs"):
        return True
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pending = any(len(q.queue) for q in getattr(queue, "event_queue_per_concurrency_id", {}).values()
                      if hasattr(q, "queue"))
        if not pending and all(job is None for job in queue.active_jobs):
            return True
        time.sleep(0.2)
    return False


def launch(cfg: DemoConfig, host: str = "127.0.0.1", port: int | None = None, autorun: bool = False,
           block: bool = True, concurrency: int = 1):
    """Build and serve the app with a queue (`concurrency` jobs at a time); returns (app, url)."""
    demo = Demo(cfg)
    app = build_app(demo, autorun=autorun)
    app.queue(default_concurrency_limit=concurrency, max_size=32)
    allowed = [cfg.runs_dir] if cfg.runs_dir else []
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=allowed,
                           quiet=True, max_file_size=int(cfg.max_upload_mb * 2**20))
    return app, url
