"""Configs: YAML files, dataclasses and dotted command-line overrides.

A config is a tree of `@dataclass`es whose fields carry `metadata={"help": ...}` and check their own
meaning in `__post_init__` (trl style). This module turns YAML plus overrides into that tree and checks
every value against its annotation while loading, so a typo fails before any model is built:

    >>> cfg = load_config(GRPOConfig, "configs/grpo_sd3.yaml", ["train.lr=1e-4", "model.lora_rank=8"])
    >>> save_config(cfg, run_dir / "config.yaml")
    >>> load_config(GRPOConfig, run_dir / "config.yaml") == cfg
    True

Supported annotations: `int`, `float` (ints accepted), `bool` (no 0/1), `str`, `Path`, `X | None`,
other unions (first arm that fits), `Literal[...]`, `list[T]`, `tuple[T, ...]`, `tuple[A, B]`,
`dict[K, V]`, nested dataclasses and `Any` (any YAML value, kept as read; for options passed on to a
constructor that checks them itself). Dataclasses must be defined at module level, since string
annotations (`from __future__ import annotations`) are resolved with `typing.get_type_hints`. A dataclass
that moved fields into a section lists them in a `MOVED` class attribute (old name -> new dotted path), so
old configs and saved runs still load, with a FutureWarning. A numeric field may declare bounds in its metadata
(`ge`, `gt`, `le`, `lt`); every float must be finite; both are checked while loading, naming the field.

YAML is read with YAML 1.2 scalars: `1e-4` is a float (YAML 1.1 reads it as a string), only
`true`/`false` are booleans (YAML 1.1 also turns `yes`, `no`, `on`, `off` into booleans) and
`2024-01-01` stays a string. An empty override value (`model.path=`) is null.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from visalign.suggest import did_you_mean

__all__ = ["ConfigError", "apply_overrides", "check_ranges", "from_dict", "load_config", "save_config", "to_dict"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value, key or file is invalid. The message starts with the dotted field path."""


# Loading uses the YAML 1.2 core schema for booleans and floats, and reads dates as plain strings (1.2
# has no timestamps). Dumping keeps the YAML 1.1 rules as well, so that any string either version would
# read differently ("no", "1e-4", "2024-01-01") is quoted and a saved file reads the same with this
# loader and with plain `yaml.safe_load`.
_BOOL_TAG = "tag:yaml.org,2002:bool"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_YAML11_ONLY_TAGS = (_BOOL_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp")
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)


def _resolver_table(keep_yaml11: bool) -> dict[str | None, list[tuple[str, re.Pattern]]]:
    table = {
        first: [(tag, regexp) for tag, regexp in resolvers if keep_yaml11 or tag not in _YAML11_ONLY_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, regexp, first_chars in ((_BOOL_TAG, _BOOL_RE, "tTfF"), (_FLOAT_TAG, _FLOAT_RE, "-+.0123456789")):
        for first in first_chars:
            table.setdefault(first, []).append((tag, regexp))
    return table


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers = _resolver_table(keep_yaml11=False)


class _Dumper(yaml.SafeDumper):
    yaml_implicit_resolvers = _resolver_table(keep_yaml11=True)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `cls` instance: dataclass defaults, updated by the YAML file at `path`, then by `overrides`.

    Every value is checked here, so a bad config fails before any compute. Overrides are applied on top
    of the YAML merged over the defaults: `rewards.clip=2.0` changes one entry of a default dict and
    keeps the others.

    Args:
        cls: the root config dataclass.
        path: a YAML file whose top level is a mapping, or None to start from the defaults.
        overrides: items `dotted.key=value`; `value` is parsed as YAML (`1e-4`, `true`, `[1, 2]`, `null`).

    Raises:
        ConfigError: the file is missing or not valid YAML, an override is malformed, or a key or value
            does not fit `cls`.
    """
    data = {} if path is None else read_yaml(path)
    data = apply_overrides(_fill_defaults(cls, data), overrides)
    return from_dict(cls, data)


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping. Errors name the file, and for a syntax error (a tab, an unclosed bracket, a
    missing colon) its line and column as editors count them: `configs/x.yaml:4:3: invalid YAML: ...`."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise ConfigError(f"config file {path} cannot be read as text: {e}") from e
    try:
        loaded = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = e.problem or "syntax error"
        hint = " (YAML indents with spaces, not tabs)" if "\\t" in problem else ""
        context = f" {e.context}" if e.context else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{context}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        kind = {list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(loaded),
                                                                                        type(loaded).__name__)
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...), got {kind}")
    return loaded or {}


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """Return a copy of `data` with each `dotted.key=value` override set; `data` is not changed.

    Missing intermediate mappings (or ones set to null) are created. Whether a key exists in the config
    is checked later, by `from_dict`, which knows the schema.
    """
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r}: expected 'dotted.key=value', e.g. 'train.lr=1e-4'")
        try:
            value = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from e
        node = result
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                parent = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {parent} is a {type(node[part]).__name__} ({node[part]!r}), "
                    f"not a mapping, so it has no key {parts[depth + 1]!r}"
                )
            node = node[part]
        node[parts[-1]] = value
    return result


def from_dict(cls: type[T], data: Mapping, prefix: str = "") -> T:
    """Build a `cls` instance from plain data, checking keys and value types against the annotations.

    Nested dataclasses are built first, then `cls(**kwargs)` runs its `__post_init__`; a ValueError from
    it is re-raised as ConfigError prefixed with this dataclass's dotted path.

    Args:
        cls: a dataclass type.
        data: a mapping from field names to plain values (as read from YAML).
        prefix: dotted path of this dataclass inside the root config, used in error messages.
    """
    where = prefix or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}"
        )
    data = _migrate(data, getattr(cls, "MOVED", {}), prefix)
    hints = typing.get_type_hints(cls)
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in init_fields]
    unknown = [key for key in data if key not in names]
    if unknown:
        paths = ", ".join(_join(prefix, key) for key in unknown)
        hint = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
        raise ConfigError(f"unknown field {paths}{hint}; valid fields of {where}: {', '.join(names)}")
    missing = [f.name for f in init_fields if f.name not in data and not _has_default(f)]
    if missing:
        raise ConfigError(f"missing required field {', '.join(_join(prefix, name) for name in missing)}")
    kwargs = {key: _convert(hints[key], value, _join(prefix, key)) for key, value in data.items()}
    for f in init_fields:
        if f.name in kwargs and hints[f.name] is not Any:
            _check_number(kwargs[f.name], f.metadata, _join(prefix, f.name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from e


# Bounds a numeric field declares in its metadata ({"help": ..., "ge": 0, "lt": 1}); every float must also be
# finite unless its metadata says {"finite": False}.
_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, "type = default", meaning and range) of every field, sections flattened: the reference
    `--help` prints, generated from the dataclasses so it cannot drift from them."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, name = hints[f.name], _join(prefix, f.name)
        section = tp if dataclasses.is_dataclass(tp) else None
        if section is not None:
            rows += describe_fields(section, name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        if dataclasses.is_dataclass(default):
            default = to_dict(default)
        help_text = f.metadata.get("help", "")
        bounds = bounds_text(f.metadata)
        rows.append((name, f"{_type_text(tp)} = {default!r}", help_text + (f" ({bounds})" if bounds else "")))
    return rows


def _type_text(tp) -> str:
    """A field's type as --help shows it: a Literal as its choices."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    text = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
    return text or str(tp).replace("typing.", "")


def fields_help(cls: type, width: int = 118) -> str:
    """`describe_fields` as an aligned text table for an argparse epilog."""
    rows = describe_fields(cls)
    left = min(max(len(n) for n, _, _ in rows), 34)
    lines = [f"config fields of {cls.__name__} (YAML keys, or dotted overrides such as "
             f"{rows[0][0]}=...):"]
    for name, kind, meaning in rows:
        lines.append(f"  {name.ljust(left)}  {kind}")
        if meaning:
            lines.append(f"  {' ' * left}    {meaning}"[:width])
    return "\n".join(lines)


def bounds_text(meta: Mapping) -> str:
    """A field's declared range, e.g. "> 0" or ">= 0 and < 1"; "" when it declares none."""
    return " and ".join(f"{sym} {meta[key]}" for key, (_, sym) in _BOUNDS.items() if key in meta)


def _check_number(value: Any, meta: Mapping, path: str) -> None:
    """Numbers (also inside lists, tuples and dicts of numbers) must be finite and inside the field's bounds."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_number(item, meta, f"{path}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(item, (int, float)):
                _check_number(item, meta, _join(path, key))
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value) and meta.get("finite", True):
        raise ConfigError(f"{path}={value} must be a finite number" +
                          (f" ({bounds_text(meta)})" if bounds_text(meta) else ""))
    if any(key in meta and not op(value, meta[key]) for key, (op, _) in _BOUNDS.items()):
        raise ConfigError(f"{path}={value} must be {bounds_text(meta)}")


def check_ranges(obj: Any, prefix: str = "") -> None:
    """The same checks on a dataclass built in Python rather than loaded (a root config's `__post_init__` calls
    it), recursing into its sections."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, path = getattr(obj, f.name), _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, path)
        elif hints[f.name] is not Any:
            _check_number(value, f.metadata, path)


def _migrate(data: Mapping, moved: Mapping[str, str], prefix: str) -> dict:
    """Move keys a dataclass renamed (its `MOVED` class attribute: old field name -> new dotted path below it)
    to their new place, warning once per key. An old name that is now a section's name (`balance` ->
    `balance.method`) moves only when its value is not already a mapping."""
    data = dict(data)
    # a section's own old name first, so that the other keys moved into it land in the mapping it becomes
    for old, new in sorted(moved.items(), key=lambda kv: kv[0] != kv[1].split(".")[0]):
        if old not in data or (old == new.split(".")[0] and isinstance(data[old], Mapping)):
            continue
        value = data.pop(old)
        *sections, leaf = new.split(".")
        node = data
        for section in sections:
            node[section] = dict(node.get(section) or {})
            node = node[section]
        node[leaf] = value
        warnings.warn(f"config: {_join(prefix, old)} is now {_join(prefix, new)}; the old name still loads but "
                      "will go", FutureWarning, stacklevel=2)
    return data


def to_dict(obj: Any) -> dict:
    """Return a dataclass instance as nested plain data: dicts, lists, str for Path. Fields with
    `init=False` are left out, since `from_dict` cannot set them."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(obj).__name__}")
    return _to_plain(obj)


def save_config(obj: Any, path: str | Path) -> None:
    """Write a dataclass instance as YAML that `load_config(type(obj), path)` reads back equal."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(to_dict(obj), Dumper=_Dumper, sort_keys=False))


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass `tp` names, directly or as `SomeConfig | None`; otherwise None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
        tp = arms[0] if len(arms) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _fill_defaults(cls: type, data: Mapping) -> dict:
    """Return `data` with every missing field that has a default filled in as plain data, recursing
    into nested dataclasses, so that overrides land on the full default tree."""
    result = dict(data)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in result:
            nested = _nested_dataclass(hints[f.name])
            if nested is not None and isinstance(result[f.name], Mapping):
                result[f.name] = _fill_defaults(nested, result[f.name])
        elif f.default is not dataclasses.MISSING:
            result[f.name] = _to_plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            result[f.name] = _to_plain(f.default_factory())
    return result


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "")


def _mismatch(tp: Any, value: Any, path: str) -> ConfigError:
    return ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the annotation `tp` and build the typed value (dataclass, tuple, Path)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return copy.deepcopy(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arm for arm in args if arm is not type(None)]
        if len(arms) == 1:
            return _convert(arms[0], value, path)
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except ConfigError:
                continue
        raise _mismatch(tp, value, path)
    if origin is Literal:
        # Compare types too: True == 1, but `true` is not an allowed value of Literal[0, 1].
        if any(value == allowed and type(value) is type(allowed) for allowed in args):
            return value
        allowed = ", ".join(repr(a) for a in args)
        hint = did_you_mean(value, [str(a) for a in args]) if isinstance(value, str) else ""
        raise ConfigError(f"{path}: expected one of {allowed}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, path)
        return [_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, path)
        if len(args) == 2 and args[1] is Ellipsis:
            item_types = [args[0]] * len(value)
        elif len(value) != len(args):
            raise ConfigError(
                f"{path}: expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}"
            )
        else:
            item_types = list(args)
        return tuple(_convert(t, item, f"{path}[{i}]")
                     for i, (t, item) in enumerate(zip(item_types, value, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _mismatch(tp, value, path)
        key_type, value_type = args
        return {
            _convert(key_type, key, f"{path} key {key!r}"): _convert(value_type, item, _join(path, key))
            for key, item in value.items()
        }
    if tp is bool:
        if type(value) is not bool:
            raise _mismatch(tp, value, path)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _mismatch(tp, value, path)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _mismatch(tp, value, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _mismatch(tp, value, path)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _mismatch(tp, value, path)
        return Path(value)
    raise TypeError(f"{path}: annotation {_type_name(tp)} is not supported by visalign.config")
