"""The world base model behind the adapter interface, its pretraining loop and the world eval suite."""

import json

import pytest
import torch

from visalign.cli import main
from visalign.sampling import SDEOptions, sample, trajectory_log_prob
from visalign.world.grammar import TEMPLATES
from visalign.world.model import SHIPPED, WorldAdapter
from visalign.world.motion import parse_motion_prompt
from visalign.world.pretrain import PretrainConfig, _Trainable, batch_for_step, flow_matching_loss, pretrain
from visalign.world.render import render_batch
from visalign.world.suite import markdown_table, score_world, suite_prompts


@pytest.fixture
def world():
    return WorldAdapter.random(0)


def test_save_load_round_trip(world, tmp_path):
    path = world.save_pretrained(tmp_path / "m.safetensors")
    loaded = WorldAdapter.from_pretrained(path)
    cond = world.encode_prompts(["a red circle", "two blue squares"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.predict_velocity(x, 0.4, loaded.encode_prompts(cond.prompts), 3.0),
                               world.predict_velocity(x, 0.4, cond, 3.0), rtol=0, atol=0)


def test_bad_input(world, tmp_path):
    with pytest.raises(ValueError, match="outside the world's vocabulary: purple.*allowed: "):
        world.encode_prompts(["a purple circle"])
    with pytest.raises(ValueError, match="32x32 only"):
        world.latent_shape(64, 64)
    with pytest.raises(ValueError, match="does not exist"):
        WorldAdapter.from_pretrained(tmp_path / "missing.safetensors")
    # a training checkpoint's model.safetensors holds the denoiser alone (unprefixed keys): named, not a key dump
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in world.denoiser.state_dict().items()}, tmp_path / "denoiser.safetensors")
    with pytest.raises(ValueError, match=r"holds no whole model \('unet.' and 'text_encoder.' weights\); a run "
                                         r"writes its whole model to final/model.safetensors"):
        WorldAdapter.from_pretrained(tmp_path / "denoiser.safetensors")


def test_bf16_training_passes_use_the_math_attention_kernel(world, monkeypatch):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    import visalign.world.model as model_module

    chosen = []

    def recording(backends):
        chosen.append(backends)
        return sdpa_kernel(backends)

    monkeypatch.setattr(model_module, "sdpa_kernel", recording)
    cond = world.encode_prompts(["a red circle", "two blue squares"])
    x, bf16 = torch.randn(2, 3, 32, 32), lambda: torch.autocast("cpu", torch.bfloat16)
    for grad, autocast, picked in ((True, bf16, [[SDPBackend.MATH]]), (False, bf16, []),
                                   (True, contextlib.nullcontext, [])):
        chosen.clear()
        with torch.set_grad_enabled(grad), autocast():
            world.predict_velocity(x, 0.4, cond, 3.0)
        assert chosen == picked
    # The math kernel (the grad pass) is as close to the fp32 velocity as PyTorch's own choice (no grad) in bf16.
    with torch.no_grad():
        exact = world.predict_velocity(x, 0.4, cond, 3.0)
    with bf16():
        math_err = (world.predict_velocity(x, 0.4, cond, 3.0).float().detach() - exact).abs().mean()
        with torch.no_grad():
            default_err = (world.predict_velocity(x, 0.4, cond, 3.0).float() - exact).abs().mean()
    assert chosen == [[SDPBackend.MATH]]
    assert math_err < 1.5 * default_err


def test_sde_log_prob_round_trip_on_world(world):
    cond = world.encode_prompts(["a red circle", "a green square on the left"])
    traj = sample(world, cond, num_steps=4, height=32, width=32, guidance_scale=3.0, seeds=[0, 1],
                  sde=SDEOptions("flow_grpo", 0.7))
    again = trajectory_log_prob(world, traj, 2, cond.index([1]), 3.0, index=torch.tensor([1]))
    assert (again.log_prob - traj.log_probs[1, 2]).abs().max() <= 1e-6


def test_lora_round_trip(world, tmp_path):
    world.add_lora(rank=4)
    cond = world.encode_prompts(["a red circle"], cfg=False)
    x = torch.randn(1, 3, 32, 32)
    opt = torch.optim.SGD(world.trainable_parameters(), lr=0.1)
    world.predict_velocity(x, 0.5, cond).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        v = world.predict_velocity(x, 0.5, cond)
        with world.lora_disabled():
            assert not torch.allclose(world.predict_velocity(x, 0.5, cond), v)
    world.save_lora(tmp_path / "lora")
    fresh = WorldAdapter.random(0)
    fresh.load_lora(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict_velocity(x, 0.5, cond), v, rtol=1e-5, atol=1e-6)


def test_flow_matching_loss_by_hand():
    x0, noise = torch.full((1, 2), 0.5), torch.full((1, 2), -1.0)
    # a predictor that returns x_sigma itself: x_sigma = 0.5*0.5 + 0.5*(-1) = -0.25; target -1.5
    loss, metrics = flow_matching_loss(lambda x, s: x, x0, noise, torch.tensor([0.5]))
    assert loss.item() == pytest.approx(1.25**2) and metrics["loss"] == pytest.approx(1.25**2)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_pretrain_updates_and_resume_reproduces(tmp_path):
    common = {"batch_size": 4, "steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "threads": 1,
              "ema_decay": 0.5}
    straight = pretrain(PretrainConfig(out_dir=str(tmp_path / "a"), **common), progress=False)
    # "Interrupted" after 2 steps: with one warm-up step the lr of steps 0-1 is the peak for any total, so a
    # steps=2 run leaves exactly the state.pt a steps=4 run writes at step 2; then resume to 4.
    state_b = tmp_path / "b"
    pretrain(PretrainConfig(out_dir=str(state_b), **{**common, "steps": 2}), progress=False)
    assert json.loads((state_b / "state.json").read_text())["step"] == 2 and not list(state_b.glob("*.pt"))
    resumed = pretrain(PretrainConfig(out_dir=str(state_b), **common), progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    init = _Trainable(WorldAdapter.random(0)).state_dict()
    changed = [k for k in a if not torch.equal(init[k], a[k])]
    assert any(k.startswith("unet.") for k in changed) and any(k.startswith("text_encoder.") for k in changed)


def test_pretrain_resume_refuses_pickles_and_torn_state(tmp_path):
    common = {"batch_size": 2, "steps": 2, "warmup_steps": 1, "checkpoint_every": 1, "threads": 1}
    old = tmp_path / "old"
    old.mkdir()
    torch.save({"step": 1}, old / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt is a pickle of an older visalign"):
        pretrain(PretrainConfig(out_dir=str(old), **common), progress=False)
    torn = tmp_path / "torn"
    pretrain(PretrainConfig(out_dir=str(torn), **{**common, "steps": 1}), progress=False)
    state = json.loads((torn / "state.json").read_text())
    (torn / "state.json").write_text(json.dumps({**state, "step": 2}))  # the JSON of another save
    with pytest.raises(ValueError, match="from different saves"):
        pretrain(PretrainConfig(out_dir=str(torn), **common), progress=False)


def test_pretrain_config_validation():
    with pytest.raises(ValueError, match="templates .*colour.* not allowed"):
        PretrainConfig(templates=["colour"])
    with pytest.raises(ValueError, match="caption_noise=1.5 must be in"):
        PretrainConfig(video=True, caption_noise=1.5)
    with pytest.raises(ValueError, match="caption_noise applies to the video world only"):
        PretrainConfig(caption_noise=0.5)
    with pytest.raises(ValueError, match="denoiser='dit' not allowed; choose from unet, wan"):
        PretrainConfig(video=True, denoiser="dit")
    with pytest.raises(ValueError, match="denoiser='wan' applies to the video world only"):
        PretrainConfig(denoiser="wan")


def test_pretrain_trains_the_wan_video_denoiser(tmp_path):
    from visalign.world.model import WorldVideoAdapter

    cfg = PretrainConfig(out_dir=str(tmp_path), video=True, denoiser="wan", batch_size=2, steps=2, warmup_steps=1,
                         threads=1, ema_decay=0.0)
    trained = WorldVideoAdapter.from_pretrained(pretrain(cfg, progress=False))
    assert trained.denoiser_kind == "wan"
    init = WorldVideoAdapter.random(0, denoiser="wan").denoiser.state_dict()
    after = trained.denoiser.state_dict()
    changed = [k for k in init if not torch.allclose(init[k], after[k].float(), atol=1e-3)]
    assert any(".attn1." in k for k in changed) and any(".ffn." in k for k in changed)


def test_caption_noise_misdescribes_directions_only():
    clean = PretrainConfig(video=True, batch_size=64, cond_dropout=0.0)
    noisy = PretrainConfig(video=True, batch_size=64, cond_dropout=0.0, caption_noise=1.0)
    (p0, x0, n0, s0), (p1, x1, n1, s1) = batch_for_step(clean, 5), batch_for_step(noisy, 5)
    # Same clips, noise and levels: only the captions change, and the clean run's batches are untouched by the option.
    assert torch.equal(x0, x1) and torch.equal(n0, n1) and torch.equal(s0, s1)
    assert batch_for_step(noisy, 5)[0] == p1  # reproducible per (seed, step)
    changed = 0
    for a, b in zip(p0, p1, strict=True):
        sa, sb = parse_motion_prompt(a), parse_motion_prompt(b)
        assert sa.template == sb.template
        assert [(o.color, o.shape, o.speed, o.stops) for o in sa.objects] == \
               [(o.color, o.shape, o.speed, o.stops) for o in sb.objects]
        changed += a != b
    # Every moving object's direction is redrawn among its seen variants, so most captions change.
    assert 0.4 < changed / len(p0) < 0.9


def test_score_world_on_ground_truth():
    specs = suite_prompts("seen", 6, 0)
    assert [s.template for s in specs] == [t for t in TEMPLATES for _ in range(6)]
    results = score_world(render_batch(specs, 0), specs)
    assert results["overall"] >= 0.95 and results["categories"]["colors"] == 1.0
    assert results["cleanliness"] >= 0.95
    assert set(results["hard_tier"]) == {"relation"}
    table = markdown_table({"seen": results})
    assert "| relation (hard tier) |" in table and "cleanliness" in table


def test_suite_prompts_split_disjoint():
    seen = {s.prompt for s in suite_prompts("seen", 20, 0)}
    held = {s.prompt for s in suite_prompts("heldout", 20, 0)}
    assert not seen & held


def test_eval_cli_writes_results(tmp_path, capsys):
    ckpt = WorldAdapter.random(0).save_pretrained(tmp_path / "w.safetensors")
    out = tmp_path / "eval"
    assert main(["eval", "--suite", "world", "--out", str(out), "--model-path", str(ckpt),
                 "n_per_template=2", "steps=2", "splits=[heldout]"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"heldout"} and results["heldout"]["n"] == 2 * len(TEMPLATES)
    assert (out / "grid_heldout.png").exists() and "overall whole-prompt" in capsys.readouterr().out


def test_shipped_checkpoint_is_small_and_loads():
    if not SHIPPED.exists():
        pytest.skip("base checkpoint not shipped yet")
    assert SHIPPED.stat().st_size <= 20 * 2**20
    model = WorldAdapter.from_pretrained()
    assert sum(p.numel() for p in model.denoiser.parameters()) > 1e6


def test_quickstart_end_to_end_small(tmp_path, capsys):
    """The main job's full path (evaluate, align, evaluate, before/after outputs) at a tiny budget."""
    rc = main(["quickstart", "--out", str(tmp_path), "--steps", "1", "--n", "1", "train.prompts_per_step=2",
               "train.group_size=2", "train.train_batch_size=4", "sampling.batch_size=4"])
    assert rc == 0
    table = (tmp_path / "table.md").read_text()
    # what ran is said: the shipped recipe, its steps, how many prompts (1 per template of its 3 templates)
    assert table.startswith("dgpo, 1 steps; evaluated on 3 prompts per split (1 per template)")
    assert "| **overall whole-prompt** | seen |" in table and "| cleanliness | heldout |" in table
    assert "| relation whole-prompt |" not in table  # only the templates it trains on
    assert "95% interval of Δ (paired)" in table
    overall = next(line for line in table.splitlines() if line.startswith("| **overall whole-prompt** | seen"))
    low, high = (float(v) for v in overall.rsplit("[", 1)[1].split("]")[0].split(","))
    delta = float(overall.split("|")[5])
    assert low <= delta <= high  # the paired interval brackets the change it describes
    assert (tmp_path / "before_after_seen.png").exists() and (tmp_path / "run" / "final" / "model.safetensors").exists()
    out = capsys.readouterr().out
    assert "before_after" in out and "[2/3] aligning with dgpo for 1 steps" in out


TINY_QUICKSTART = ["--steps", "2", "--n", "3", "train.prompts_per_step=2", "train.group_size=2",
                   "train.train_batch_size=4", "sampling.batch_size=4", "sampling.steps=4"]


def test_an_interrupted_quickstart_resumes_to_the_same_table(tmp_path, monkeypatch, capsys):
    from visalign.trainers.engine import OnlineTrainer

    assert main(["quickstart", "--out", str(tmp_path / "whole"), *TINY_QUICKSTART]) == 0
    train = OnlineTrainer.train

    def killed(self, stop_after=None):  # the machine goes down after the first step's checkpoint
        train(self, stop_after=1)
        raise KeyboardInterrupt

    monkeypatch.setattr(OnlineTrainer, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["quickstart", "--out", str(tmp_path / "cut"), *TINY_QUICKSTART])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["quickstart", "--out", str(tmp_path / "cut"), "--resume", *TINY_QUICKSTART]) == 0
    assert "evaluation on 9 + 9 prompts is in" in capsys.readouterr().out  # the base evaluation was reused
    tables = [(tmp_path / run / "table.md").read_text().split("\n", 2)[2] for run in ("whole", "cut")]
    assert tables[0] == tables[1]  # every number, after the line giving the time
    # labelled grids: 3 distinct tiles per template (n=3 < 8 repeats nothing), one per sample
    from PIL import Image

    grid = Image.open(tmp_path / "whole" / "aligned" / "grid_seen.png")
    assert grid.width == 110 + 3 * (96 + 4)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps=0 must be >= 1"),
    (["--n", "-1"], "--n=-1 must be >= 1"),
    (["train.prompts=world:heldout"], "must be the world's seen split"),
    (["train.lr=abc"], "train.lr: expected float"),
])
def test_quickstart_refuses_bad_input_before_any_model_loads(tmp_path, capsys, argv, message):
    assert main(["quickstart", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "base").exists()


def test_world_suite_on_the_shipped_model_reproduces_across_runs(tmp_path):
    from visalign.world.suite import WorldEvalConfig, evaluate_world

    model = WorldAdapter.from_pretrained()
    runs = [evaluate_world(model, WorldEvalConfig(out=str(tmp_path / str(i)), n_per_template=3, steps=4,
                                                  batch_size=8 + 5 * i), progress=False) for i in range(2)]
    for split in ("seen", "heldout"):
        a, b = runs[0][split], runs[1][split]
        # same verdict on every prompt, different batching (cleanliness to float rounding)
        assert {k: a["per_sample"][k] for k in ("template", "passed")} == \
            {k: b["per_sample"][k] for k in ("template", "passed")}
        assert a["per_sample"]["cleanliness"] == pytest.approx(b["per_sample"]["cleanliness"], abs=5e-4)
        assert round(a["overall"], 3) == round(b["overall"], 3) and a["cleanliness"] == pytest.approx(
            b["cleanliness"], abs=5e-4)


def test_token_embedding_std_redraws_only_the_word_embeddings():
    plain, scaled = WorldAdapter.random(3), WorldAdapter.random(3, token_embedding_std=0.5)
    key = "embeddings.token_embedding.weight"
    before, after = plain.text_encoder.state_dict(), scaled.text_encoder.state_dict()
    for name in after:
        if name != key:
            assert torch.equal(before[name], after[name]), name
    for a, b in zip(plain.denoiser.parameters(), scaled.denoiser.parameters(), strict=True):
        assert torch.equal(a, b)
    words = after[key]
    assert abs(words.std().item() - 0.5) < 0.05 and abs(before[key].std().item() - 0.02) < 0.005
    # Seeded: the same call draws the same embeddings.
    assert torch.equal(words, WorldAdapter.random(3, token_embedding_std=0.5).text_encoder.state_dict()[key])
    with pytest.raises(ValueError, match="token_embedding_std"):
        WorldAdapter.random(3, token_embedding_std=0.0)


def test_world_comparison_mode_reports_paired_deltas(tmp_path, capsys):
    import json

    from visalign.cli import main
    from visalign.world.model import WorldAdapter

    other = tmp_path / "random.safetensors"
    WorldAdapter.random(0).save_pretrained(other)
    code = main(["eval", "--suite", "world", "--out", str(tmp_path / "cmp"), "--compare", "base", "--compare",
                 str(other), "n_per_template=3", "steps=4", "splits=[seen]"])
    assert code == 0
    deltas = json.loads((tmp_path / "cmp" / "comparison.json").read_text())[str(other)]["seen"]
    base = json.loads((tmp_path / "cmp" / "entry_0" / "results.json").read_text())["seen"]
    rand = json.loads((tmp_path / "cmp" / "entry_1" / "results.json").read_text())["seen"]
    assert deltas["overall"]["delta"] == pytest.approx(rand["overall"] - base["overall"])
    assert deltas["overall"]["low"] <= deltas["overall"]["delta"] <= deltas["overall"]["high"]
    assert deltas["overall"]["n"] == 18 and set(deltas) == {"overall", "cleanliness", *base["templates"]}
    assert deltas["cleanliness"]["delta"] == pytest.approx(rand["cleanliness"] - base["cleanliness"], abs=1e-6)
    assert "Δ" in capsys.readouterr().out


def test_world_generation_progress_moves_every_denoising_step(capsys):
    from visalign.world.suite import generate_world, suite_prompts

    specs = suite_prompts("seen", 2, 0, ("count",))
    generate_world(WorldAdapter.from_pretrained(), specs, steps=3, guidance=3.0, seed=0, batch_size=2)
    err = capsys.readouterr().err.replace("\r", "\n")
    seen = {line.split("|")[-1].split("[")[0].strip() for line in err.splitlines() if "sample-steps" in line}
    assert "6/6" in seen and all(v.endswith("/6") for v in seen)  # counted in sample-steps: 2 samples x 3 steps
