"""bench/scale.py: the shipped full-size configs are the checkpoints' architectures (parameter counts of the real
weights), every recipe's step trains, and the CLI's scaled-down mode prints its comparison."""

import subprocess
import sys
from pathlib import Path

import pytest
import scale
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("family", "count"), [
    # the hub checkpoints' sizes: 4.94 GB fp16 with the 384^2 x 1536 position table (226.5 M, a buffer), 7.75 GB
    # bf16, 5.68 GB fp32, 40.9 GB bf16
    ("sd35-medium", 2_243_171_520), ("flux2-klein-4b", 3_875_544_576), ("wan21-1.3b", 1_418_996_800),
    ("qwen-image", 20_430_401_088)])
def test_full_size_configs_build_the_real_architectures(family, count):
    model = scale.FAMILIES[family][0].build(small=False, dtype=torch.bfloat16, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("family", list(scale.FAMILIES))
def test_every_recipe_step_trains_the_lora_weights(family):
    arm = scale.Arm(family, "lora", small=True, dtype=torch.float32, device="cpu", checkpointing=False, lora_rank=2)
    assert 0 < arm.n_trained < arm.n_params
    for recipe in scale.RECIPES:
        before = [p.detach().clone() for p in arm.params]
        arm.step(recipe, batch=2)
        changed = sum(not torch.equal(a, p) for a, p in zip(before, arm.params, strict=True))
        assert changed > 0, f"{family} {recipe}: no trained weight moved"


def test_fits_extrapolates_linearly_from_batch_one_and_two():
    rows = [{"model": "m", "finetune": "lora", "recipe": "awm", "batch": b, "peak": p}
            for b, p in [(1, 30e9), (2, 40e9)]]
    assert scale.fits(rows, rows[0]) == "6"  # 20 GB fixed + 10 GB a sample: 6 samples in 80 GB


@pytest.mark.slow
def test_small_mode_prints_every_model_recipe_and_mode():
    out = subprocess.run([sys.executable, str(ROOT / "bench/scale.py"), "--small", "--repeats", "1"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert len(rows) == 3 * 2 * 4 * 2  # models x fine-tuning x recipes (plain included) x batches
    assert all(float(r.split("|")[5].split("(")[0]) > 0 for r in rows)  # "median (lowest – highest)"
