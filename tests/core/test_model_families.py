"""What every model family must do, checked on each tiny build: SDE log-probs recomputed on other mini-batches
give ratio 1, and two steps of Flow-GRPO and of DiffusionNFT change the LoRA weights and nothing else (editing
models from a prompt file naming source images). Each family's own file checks its pipeline parity, LoRA files,
loading code and what is particular to it."""

import json

import pytest
import torch
from PIL import Image

from visalign.models import FAMILIES, load_model, request_rules
from visalign.models.base import encode
from visalign.sampling import SDEOptions, sample, trajectory_log_prob
from visalign.trainers import trainer_class

TINY = [t for f in FAMILIES for t in f.tiny]
PROMPTS = ["a red circle", "a blue square", 'a card reading "ok"', "two yellow circles on the left"]


def request(name: str) -> dict:
    """The smallest request a tiny model draws (at least 16 px), 5 frames for video."""
    rules = request_rules(name)
    size = -(-16 // rules.multiple) * rules.multiple
    return {"height": size, "width": size, **({"num_frames": 5} if rules.video else {})}


@pytest.mark.parametrize("name", TINY)
def test_recomputed_log_probs_match_sampling(name):
    adapter = load_model(name)
    req = request(name)
    images = torch.rand(4, 3, req["height"], req["width"], generator=torch.Generator().manual_seed(1))
    cfg = adapter.guidance == "cfg"
    cond = encode(adapter, PROMPTS, cfg=cfg, images=images if adapter.edits else None)
    guidance = 4.0  # CFG where the model has it; an embedded scale otherwise
    traj = sample(adapter, cond, num_steps=3, guidance_scale=guidance, seeds=[0, 1, 2, 3],
                  sde=SDEOptions("flow_grpo", 0.7), **req)
    assert traj.stochastic.any()
    for step in torch.nonzero(traj.stochastic).flatten().tolist():
        for rows in ([0], [1, 2, 3], [3, 0]):  # mini-batches of other sizes and orders
            with torch.no_grad():
                out = trajectory_log_prob(adapter, traj, step, cond.index(rows), guidance, index=torch.tensor(rows))
            assert (out.log_prob - traj.log_probs[rows, step]).abs().max() <= 1e-6


def edit_prompts(tmp_path, size: int):
    rows = []
    for i in range(2):
        Image.new("RGB", (size, size), (40 + 150 * i, 80, 200 - 150 * i)).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": f"edit number {i}", "source_image": f"src{i}.png"})
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("trainer", ["flow_grpo", "diffusion_nft"])
@pytest.mark.parametrize("name", TINY)
def test_two_steps_change_the_lora_weights_only(tiny_run, name, trainer, tmp_path):
    req = request(name)
    overrides = [f"model.{k}={v}" for k, v in req.items()]
    if request_rules(name).edits:
        overrides.append(f"train.prompts={edit_prompts(tmp_path, req['height'])}")
    cfg = tiny_run("model.lora_rank=4", "rewards={tests.helpers.toy_rewards.MeanBrightness: 1.0}", *overrides,
                   trainer=trainer, model=name, out=tmp_path / "run")
    t = trainer_class(trainer)(cfg)
    named = dict(t.adapter.denoiser.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    trainable = {n for n, p in named.items() if p.requires_grad}
    t.train()
    changed = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert changed and changed <= trainable and all("lora_" in n for n in trainable)
    assert any((tmp_path / "run" / "final").glob("pytorch_lora_weights*.safetensors"))  # diffusers' format
