"""Every numeric field of every recipe's config declares its range, and a value outside it (or a non-finite float)
fails when the config loads — before any model does — with the field's dotted name in the message."""

import dataclasses
import math
import re
import typing

import pytest

from visalign.config import ConfigError, bounds_text, load_config
from visalign.registry import import_target
from visalign.trainers import TRAINERS, load_train_config


def numeric_fields(cls, prefix=""):
    """(dotted path, annotation, metadata) of every int / float field, also inside tuples, optionals and nested
    sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], f"{prefix}{f.name}"
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        section = next((a for a in args if dataclasses.is_dataclass(a)), None)
        if section is not None:
            yield from numeric_fields(section, path + ".")
        elif typing.get_origin(tp) is not dict and (any(a in (int, float) for a in args) or (
                typing.get_origin(tp) is tuple and set(typing.get_args(tp)) <= {int, float})):
            yield path, tp, f.metadata


FIELDS = sorted({(name, path, str(tp), tuple(sorted(meta.items(), key=str)))
                 for name in TRAINERS for path, tp, meta in numeric_fields(import_target(TRAINERS[name][0]))})


def bad_value(tp: str, meta: dict):
    """A value just outside the declared range, of the field's type."""
    integer = "int" in tp and "float" not in tp
    if "ge" in meta:
        value = meta["ge"] - (1 if integer else 0.5)
    elif "gt" in meta:
        value = meta["gt"] if integer else meta["gt"] - 0.5
    elif "le" in meta:
        value = meta["le"] + (1 if integer else 0.5)
    else:
        value = meta["lt"]
    return f"[{value}, {value}]" if tp.startswith(("tuple", "list")) else value


@pytest.mark.parametrize(("trainer", "path", "tp", "meta"), FIELDS, ids=[f"{t}:{p}" for t, p, _, _ in FIELDS])
def test_every_numeric_field_refuses_a_value_outside_its_range(trainer, path, tp, meta):
    meta, name = dict(meta), re.escape(path)
    assert bounds_text(meta), f"{trainer}: {path} declares no range (add ge / gt / le / lt to its metadata)"
    with pytest.raises(ConfigError, match=rf"{name}(\[0\])?=.* must be "):
        load_train_config(None, [f"trainer={trainer}", "model.path=/never/loaded", f"{path}={bad_value(tp, meta)}"])
    if "float" in tp:
        with pytest.raises(ConfigError, match=rf"{name}(\[0\])?=(nan|inf) must be a finite"):
            value = ".nan" if not tp.startswith("tuple") else "[.nan, .nan]"
            load_train_config(None, [f"trainer={trainer}", f"{path}={value}"])


OTHER_CONFIGS = ["visalign.steering.config:SteerConfig", "visalign.generate:SampleConfig",
                 "visalign.eval.reward_suite:RewardEvalConfig", "visalign.world.pretrain:PretrainConfig",
                 "visalign.world.suite:WorldEvalConfig", "visalign.world.motion_suite:MotionEvalConfig",
                 "visalign.demo.app:DemoConfig"]
OTHER_FIELDS = [(target, path, str(tp), tuple(sorted(meta.items(), key=str)))
                for target in OTHER_CONFIGS for path, tp, meta in numeric_fields(import_target(target))]


@pytest.mark.parametrize(("target", "path", "tp", "meta"), OTHER_FIELDS,
                         ids=[f"{t.rsplit(':', 1)[1]}:{p}" for t, p, _, _ in OTHER_FIELDS])
def test_the_other_configs_refuse_values_outside_their_ranges(target, path, tp, meta):
    """Steering, sampling, evaluation and pretraining configs: the same declared ranges, checked on load."""
    meta = dict(meta)
    assert bounds_text(meta), f"{target}: {path} declares no range"
    with pytest.raises(ConfigError, match=rf"{re.escape(path)}(\[0\])?=.* must be "):
        load_config(import_target(target), None, [f"{path}={bad_value(tp, meta)}"])


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=.inf", "train.lr=inf must be a finite number (> 0)"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0 must be > 0"),
    ("run.checkpoints_total_limit=0", "run.checkpoints_total_limit=0 must be >= 1"),
    ("run.checkpoint_every=0", "run.checkpoint_every=0 must be >= 1"),
    ("run.eval_every=-1", "run.eval_every=-1 must be >= 0"),
    ("train.kl_beta=-0.1", "train.kl_beta=-0.1 must be >= 0"),
    ("train.betas=[2, 3]", "train.betas[0]=2.0 must be >= 0 and < 1"),
    ("rewards={world-verifier: .nan}", "rewards.world-verifier=nan must be a finite number"),
    ("sampling.batch_size=0", "sampling.batch_size=0 must be >= 1"),
])
def test_the_values_users_got_wrong_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, ["trainer=diffusion_nft", override])


def test_defaults_are_inside_their_ranges():
    for name in TRAINERS:
        cfg = load_train_config(None, [f"trainer={name}"])
        assert cfg.trainer == name and math.isfinite(cfg.train.lr)
