"""The one lookup behind every registry (models, rewards, prompt sources, trainers, steering methods).

A registry is a plain dict from a name to an object or to a dotted path, "package.module:attr" (or
"package.module.attr"). Dotted paths import on first use, so a registry can name a plug-in (the built-in world,
or a user's package) without importing it, and a user can pass a dotted path where a name is expected.
"""

from __future__ import annotations

import importlib

from visalign.suggest import did_you_mean


def import_target(target: str) -> object:
    """The object a dotted path names. ImportError / AttributeError propagate for the caller to word."""
    module, _, attr = target.replace(":", ".").rpartition(".")
    if not module:
        raise ImportError(f"{target!r} is not a dotted path (package.module:attr)")
    return getattr(importlib.import_module(module), attr)


def lookup(registry: dict[str, object], name: str, what: str) -> object:
    """`registry[name]` (imported when it is a dotted path) or, for a name with a dot, the dotted path itself.

    ValueError names the registered choices for an unknown name and the import error for a broken path."""
    entry = registry.get(name)
    if entry is None:
        if "." not in name:
            raise ValueError(f"unknown {what} {name!r}{did_you_mean(name, registry)}; allowed: "
                             f"{', '.join(sorted(registry))} or a dotted path")
        entry = name
    if not isinstance(entry, str):
        return entry
    try:
        return import_target(entry)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {what} {name!r} ({entry}): {err}") from err
