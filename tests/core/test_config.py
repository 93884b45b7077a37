# String annotations on purpose: the loader must resolve them with typing.get_type_hints.
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from visalign.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class TrainCfg:
    lr: float = field(default=3e-4, metadata={"help": "Learning rate."})
    steps: int = field(default=10, metadata={"help": "Optimizer steps."})
    mode: Literal["lora", "full"] = field(default="lora", metadata={"help": "Which weights to train."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "Adam betas."})
    use_ema: bool = field(default=False, metadata={"help": "Keep an EMA of the weights."})
    output_dir: Path = field(default=Path("outputs/run"), metadata={"help": "Where checkpoints go."})

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class ModelCfg:
    name: str = field(metadata={"help": "Hub id or local path of the generator."})
    path: str | None = field(default=None, metadata={"help": "Local checkpoint overriding `name`."})


@dataclass
class Cfg:
    model: ModelCfg = field(metadata={"help": "Generator to align."})
    train: TrainCfg = field(default_factory=TrainCfg, metadata={"help": "Optimisation settings."})
    rewards: dict[str, float] = field(
        default_factory=lambda: {"clip": 1.0, "aesthetic": 0.5}, metadata={"help": "Reward name to weight."}
    )
    tags: list[str] = field(default_factory=list, metadata={"help": "Free-form run tags."})
    seed: int | None = field(default=None, metadata={"help": "Random seed; None draws one."})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_load_yaml_keeps_defaults_and_reads_1e_4_as_float(tmp_path):
    # YAML 1.1 (plain yaml.safe_load) would read `1e-4` as the string "1e-4".
    path = write(tmp_path, "model:\n  name: tiny-sd3\ntrain:\n  lr: 1e-4\n  steps: 5\n")
    cfg = load_config(Cfg, path)
    assert cfg.model == ModelCfg(name="tiny-sd3")
    assert cfg.train == TrainCfg(lr=1e-4, steps=5)
    assert type(cfg.train.lr) is float
    assert cfg.rewards == {"clip": 1.0, "aesthetic": 0.5}


@pytest.mark.parametrize(
    "override, get, expected",
    [
        ("train.lr=1e-4", lambda c: c.train.lr, 1e-4),
        ("train.lr=1", lambda c: c.train.lr, 1.0),
        ("train.use_ema=true", lambda c: c.train.use_ema, True),
        ("train.betas=[0.8, 0.9]", lambda c: c.train.betas, (0.8, 0.9)),
        ("train.output_dir=/tmp/x", lambda c: c.train.output_dir, Path("/tmp/x")),
        ("model.path=null", lambda c: c.model.path, None),
        ("model.name=no", lambda c: c.model.name, "no"),  # YAML 1.1 would make this False
        ("tags=[a, b]", lambda c: c.tags, ["a", "b"]),
        ("seed=3", lambda c: c.seed, 3),
    ],
)
def test_override_parses_value(override, get, expected):
    cfg = load_config(Cfg, overrides=["model.name=m", override])
    assert get(cfg) == expected
    assert type(get(cfg)) is type(expected)


def test_override_wins_over_yaml_and_merges_into_default_dict(tmp_path):
    path = write(tmp_path, "model: {name: m}\ntrain: {steps: 5}\n")
    cfg = load_config(Cfg, path, ["train.steps=7", "rewards.clip=2.0", "rewards.ocr=1"])
    assert cfg.train.steps == 7
    assert cfg.rewards == {"clip": 2.0, "aesthetic": 0.5, "ocr": 1.0}


def test_apply_overrides_is_pure_and_creates_mappings():
    data = {"train": {"lr": 0.1}, "model": None}
    out = apply_overrides(data, ["train.lr=0.2", "model.name=m", "a.b.c=1"])
    assert out == {"train": {"lr": 0.2}, "model": {"name": "m"}, "a": {"b": {"c": 1}}}
    assert data == {"train": {"lr": 0.1}, "model": None}


@pytest.mark.parametrize("override", ["train.lr", "=1", "train..lr=1", "train.lr.x=1"])
def test_malformed_override_is_named(override):
    with pytest.raises(ConfigError, match=f"override '{override}'"):
        apply_overrides({"train": {"lr": 0.1}}, [override])


def test_unknown_key_in_yaml_names_path_and_valid_fields(tmp_path):
    path = write(tmp_path, "model: {name: m}\ntrain: {lrr: 0.1}\n")
    message = r"unknown field train\.lrr \(did you mean 'lr'\?\); valid fields of train: lr, steps, mode"
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, path)


@pytest.mark.parametrize("override, path", [("train.lrr=1", "train.lrr"), ("trian.lr=1", "trian")])
def test_unknown_key_in_override_names_path(override, path):
    with pytest.raises(ConfigError, match=f"unknown field {path}"):
        load_config(Cfg, overrides=["model.name=m", override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", "train.steps: expected int, got str 'abc'"),
        ("train.steps=1.5", "train.steps: expected int, got float 1.5"),
        ("train.mode=bogus", "train.mode: expected one of 'lora', 'full', got 'bogus'"),
        ("train.betas=[0.9, 0.99, 0.999]", "train.betas: expected 2 items"),
        ("train.betas=[0.9, fast]", r"train.betas\[1\]: expected float, got str 'fast'"),
        ("rewards.clip=high", "rewards.clip: expected float, got str 'high'"),
        ("tags=[a, 3]", r"tags\[1\]: expected str, got int 3"),
        ("model.path=3", "model.path: expected str, got int 3"),
        ("train=3", "train: expected a mapping for TrainCfg, got int 3"),
    ],
)
def test_wrong_type_names_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, overrides=["model.name=m", override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.use_ema=1", "train.use_ema: expected bool, got int 1"),
        ("train.use_ema=yes", "train.use_ema: expected bool, got str 'yes'"),
        ("train.steps=true", "train.steps: expected int, got bool True"),
        ("train.lr=true", "train.lr: expected float, got bool True"),
    ],
)
def test_bool_is_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg, overrides=["model.name=m", override])


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="missing required field model$"):
        load_config(Cfg)
    with pytest.raises(ConfigError, match=r"missing required field model\.name"):
        load_config(Cfg, overrides=["model.path=/ckpt"])


def test_nested_post_init_error_gets_path():
    with pytest.raises(ConfigError, match=r"^train: lr must be positive, got -1.0$"):
        load_config(Cfg, overrides=["model.name=m", "train.lr=-1"])
    with pytest.raises(ConfigError, match=r"^lr must be positive"):
        from_dict(TrainCfg, {"lr": 0})


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("text", ["- a\n- b\n", "model: [\n"])
def test_bad_file_raises_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match="config.yaml"):
        load_config(Cfg, write(tmp_path, text))


def test_save_load_round_trip(tmp_path):
    # "1e-4" and "no" are strings that YAML 1.1 and 1.2 read differently; they must come back as strings.
    overrides = ["model.name='1e-4'", "model.path='no'", "train.lr=1e-10", "tags=[x]", "train.mode=full"]
    cfg = load_config(Cfg, overrides=overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Cfg, path) == cfg
    saved = yaml.safe_load(path.read_text())
    assert saved == to_dict(cfg)
    assert saved["train"]["output_dir"] == "outputs/run"
    assert saved["train"]["betas"] == [0.9, 0.999]


def test_moved_flat_keys_load_into_their_sections_with_a_warning(tmp_path):
    """Configs written before the train sections nested (flat `balance: mgda`, `balance_ema`, `ema_decay`,
    `adv_clip`, `sampling.drift_scale`, `run.alarm_tolerance`) load into the sections, warning per key; a saved
    config is written nested and reads back equal without a warning."""
    from visalign.trainers import load_train_config

    old = tmp_path / "old.yaml"
    old.write_text("trainer: diffusion_nft\nsampling: {sde: ode, drift_window: [1, 3]}\n"
                   "train: {balance: mgda, balance_ema: 0.5, ema_decay: 0.9, adv_clip: 2.0}\n"
                   "rewards: {world-verifier: 1.0, world-cleanliness: 1.0}\nrun: {alarm_tolerance: 0.1}\n")
    with pytest.warns(FutureWarning, match=r"train\.balance_ema is now train\.balance\.ema"):
        cfg = load_train_config(old, ["train.cagrad_c=0.2"])
    assert (cfg.train.balance.method, cfg.train.balance.ema, cfg.train.balance.cagrad_c) == ("mgda", 0.5, 0.2)
    assert (cfg.train.ema.decay, cfg.train.advantage.clip) == (0.9, 2.0)
    assert (cfg.sampling.drift.window, cfg.run.alarm.tolerance) == ((1, 3), 0.1)
    save_config(cfg, tmp_path / "new.yaml")
    saved = yaml.safe_load((tmp_path / "new.yaml").read_text())
    assert saved["train"]["balance"]["method"] == "mgda" and "balance_ema" not in saved["train"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_train_config(tmp_path / "new.yaml") == cfg


def test_sections_check_their_own_values():
    from visalign.trainers import load_train_config

    with pytest.raises(ConfigError, match=r"train\.balance\.ema=1\.5 must be >= 0 and < 1"):
        load_train_config(None, ["train.balance.ema=1.5"])
    with pytest.raises(ConfigError, match=r"train\.advantage: best_of_n=3 must be even"):
        load_train_config(None, ["train.advantage.best_of_n=3"])
    with pytest.raises(ConfigError, match=r"train: advantage\.best_of_n=16 must be <= group_size=8"):
        load_train_config(None, ["train.advantage.best_of_n=16"])
    with pytest.raises(ConfigError, match=r"unknown field train\.balance\.emma"):
        load_train_config(None, ["train.balance.emma=0.5"])
