"""Config-time checks beyond numeric ranges: YAML errors with file, line and column; sizes and frame counts
against the model's rules without loading weights; paths that must exist. Every case fails before any model
loads, naming the field."""

import json

import pytest

import visalign.trainers.engine as engine
from visalign.config import ConfigError
from visalign.models import FAMILIES, load_model, request_rules
from visalign.train import main as train_main
from visalign.trainers import load_train_config


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("a model loaded"))


@pytest.mark.parametrize("text, message", [
    ("model:\n  name: world\ntrain:\n\tlr: 1\n", r"cfg.yaml:4:1: invalid YAML: found character '\\t'.*not tabs"),
    ("model: [1, 2\ntrain: {}\n", r"cfg.yaml:2:6: invalid YAML: expected ',' or ']'"),
    ("model:\n  name world\n  height: 32\n", r"cfg.yaml:3:9: invalid YAML: mapping values are not allowed here"),
    ("- model\n- train\n", r"cfg.yaml: the top level must be a mapping of sections .*got a list"),
    ("just a sentence\n", r"cfg.yaml: the top level must be a mapping of sections .*got a string"),
])
def test_yaml_errors_name_file_line_and_column(tmp_path, capsys, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(str(path))
    assert train_main([str(path)]) == 2  # the CLI prints it, no traceback
    assert "visalign train: error:" in capsys.readouterr().err


def _sd3_dir(tmp_path, levels=4, patch=2):
    (tmp_path / "vae").mkdir(parents=True)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128] * levels}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": patch}))
    return tmp_path


@pytest.mark.parametrize("overrides, message", [
    (["model.height=33"], r"model.height=33, model.width=32 not allowed for world: it draws 32x32 only"),
    (["model.name=world-video", "model.num_frames=5", "train.prompts=world-video:seen"],
     r"model.num_frames=5 not allowed for world-video: it draws 9 frames"),
    (["model.name=tiny-sd3", "model.width=33"], r"model.width=33 is not allowed for sd3: .*multiple of 2"),
    (["model.name=tiny-wan", "model.height=16", "model.width=16", "model.num_frames=6"],
     r"model.num_frames=6 is not allowed for wan: it must be 4k\+1"),
    (["model.name=tiny-sd3", "model.num_frames=5"], r"model.num_frames=5 given to image model sd3"),
    (["model.path=/no/such/dir"], r"model.path: model path '/no/such/dir' does not exist"),
    (["train.prompts=/no/such/prompts.txt"], r"train.prompts='/no/such/prompts.txt': no such prompt file"),
    (["run.eval_prompts=missing.jsonl"], r"run.eval_prompts='missing.jsonl': no such prompt file"),
    (["run.resume_from=/no/such/checkpoint-3"], r"run.resume_from='/no/such/checkpoint-3': no such checkpoint"),
])
def test_sizes_and_paths_fail_when_the_config_loads(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config("configs/flow_grpo_world.yaml", overrides)


def test_real_model_sizes_come_from_its_configs_without_weights(tmp_path):
    sd3 = _sd3_dir(tmp_path / "sd3")  # a checkpoint directory holding configs only: no weights to load
    rules = request_rules("sd3", str(sd3))
    assert (rules.multiple, rules.video) == (16, False)
    with pytest.raises(ValueError, match=r"model.height=520 is not allowed for sd3: .*multiple of 16"):
        load_train_config("configs/flow_grpo_world.yaml", ["model.name=sd3", f"model.path={sd3}",
                                                           "model.height=520", "model.width=512"])
    assert request_rules("sd3", "org/not-cached") is None  # a hub id not in the cache: checked after loading
    assert request_rules("sd3", None) is None


@pytest.mark.parametrize("name", [*(t for f in FAMILIES for t in f.tiny), "world", "world-video"])
def test_declared_rules_match_the_built_models(name, monkeypatch):
    monkeypatch.undo()  # this one loads the models, to compare
    assert request_rules(name) == load_model(name).rules


def test_offline_dpo_needs_an_existing_pair_file():
    with pytest.raises(ValueError, match=r"train.pairs='/no/pairs.jsonl': no such pair file"):
        load_train_config("configs/dpo_world.yaml", ["train.mode=offline", "train.pairs=/no/pairs.jsonl"])


@pytest.mark.parametrize("overrides, message", [
    (["height=30", "width=32"], r"height=30, width=32 not allowed for world: it draws 32x32 only"),
    (["lora=/no/lora"], r"lora='/no/lora': no such file or directory"),
    (["model_path=/no/model"], r"model path '/no/model' does not exist"),
])
def test_steer_configs_check_sizes_and_paths_before_loading(overrides, message, monkeypatch):
    import visalign.steering.config as steer_config
    from visalign.config import load_config

    monkeypatch.setattr(steer_config, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    with pytest.raises(ValueError, match=message):
        load_config(steer_config.SteerConfig, "configs/steer_world.yaml", overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer=diffusion_nft", "sampling.steps=3", "train.timesteps_per_sample=4"],
     r"timesteps_per_sample=4 exceeds the 3 noise levels of sampling.steps=3"),
    (["trainer=awm", "sampling.steps=6", "train.sigma_sampling=stratified", "train.timesteps_per_sample=5"],
     r"timesteps_per_sample=5 needs 5 bins .*at most 4"),
])
def test_more_training_timesteps_than_the_sampler_has_fail_at_load(overrides, message):
    # sample_sigmas would raise at the first step; the config names the fields before any model loads
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, overrides)
    load_train_config(None, [*overrides[:-1], "train.timesteps_per_sample=3"])  # within the levels: loads
