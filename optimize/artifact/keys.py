"""Keys: stable short hashes of settings, and the chained key that decides whether a stage must run again.

A stage's key hashes its settings together with the key of the stage before it (the first stage chains from the
source's content hash), so a changed setting redoes that stage and everything after it, and nothing before.

>>> stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
True
>>> len(stage_key("export", {"opset": 18}, upstream=source_key("abc")))
16
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from typing import Any


def stable_hash(obj: Any) -> str:
    """A stable short hash of a JSON-able value (dataclasses, enums and sets included)."""
    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, enum.Enum):
            return o.value
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    text = json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_key(source_sha256: str) -> str:
    """The key the first stage chains from."""
    return stable_hash({"source": source_sha256})


def stage_key(name: str, settings: dict, upstream: str) -> str:
    """The key of stage ``name``: its settings chained with the key of the stage before it."""
    return stable_hash({"stage": name, "settings": settings, "upstream": upstream})
