"""The one lazy lookup behind every registry (sources, extractors, plugins, protocols):
`name -> "module:attribute"`, imported only when asked for, so `posedata inspect` never
pays for torch."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def load_object(path: str) -> Any:
    """`"package.module:Name"` -> the object."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def lookup(registry: Mapping[str, str], name: str, what: str) -> Any:
    """The registered object for `name`; a KeyError naming the known ones otherwise."""
    if name not in registry:
        raise KeyError(f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}")
    return load_object(registry[name])
