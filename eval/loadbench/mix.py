"""What an HTTP load benchmark sends, and when: a request mix (weighted classes of size, steps, prompt length,
scheduler) and arrival times (Poisson, constant, or a recorded trace).

A mix file is JSON: ``{"classes": [{"name": "small", "weight": 3, "size": "64x64", "steps": 10, "prompt_words": 8},
{"name": "large", "weight": 1, "size": "96x96", "steps": 30, "scheduler": "euler"}]}``. A trace file has one arrival
per line: seconds since the start, optionally followed by a class name (``0.25 large``).

>>> mix = RequestMix.parse({"classes": [{"name": "a", "weight": 3}, {"name": "b", "steps": 5}]})
>>> [c.name for c in mix.sample(8, seed=0)]
['a', 'a', 'a', 'a', 'b', 'b', 'a', 'a']
>>> list(arrivals("constant", rate=2.0, requests=3))
[0.0, 0.5, 1.0]
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

CLASS_KEYS = ("name", "weight", "size", "steps", "prompt_words", "prompts", "scheduler", "n", "guidance_scale")
ARRIVALS = ("poisson", "constant", "trace")


@dataclasses.dataclass(frozen=True)
class RequestClass:
    name: str = "default"
    weight: float = 1.0
    size: "str | None" = None             # WIDTHxHEIGHT; None: the model's native size
    steps: "int | None" = None
    prompt_words: "int | None" = None     # prompts padded or cut to this many words
    prompts: tuple = ()
    scheduler: "str | None" = None
    n: int = 1
    guidance_scale: "float | None" = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not re.match(r"^[\w.-]{1,40}$", self.name):
            raise ValueError(f"class name {self.name!r} must be 1-40 letters, digits, '_', '-' or '.'")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight <= 0:
            raise ValueError(f"class {self.name}: weight {self.weight!r} must be a number > 0")
        for k in ("steps", "prompt_words", "n"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"class {self.name}: {k} {v!r} must be an integer >= 1")
        if self.size is not None and not re.match(r"^\d+x\d+$", str(self.size)):
            raise ValueError(f"class {self.name}: size {self.size!r} must be WIDTHxHEIGHT, e.g. 64x64")
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def prompt(self, i: int, default_prompts) -> str:
        base = (self.prompts or tuple(default_prompts))[i % len(self.prompts or default_prompts)]
        if self.prompt_words is None:
            return base
        words = base.split() or ["a"]
        return " ".join((words * (self.prompt_words // len(words) + 1))[:self.prompt_words])

    def body(self, i: int, seed: int, default_prompts, steps: int, guidance: "float | None") -> dict:
        """The JSON body of request ``i`` of this class."""
        b = {"prompt": self.prompt(i, default_prompts), "seed": seed, "n": self.n, "steps": self.steps or steps}
        for k in ("size", "scheduler"):
            if getattr(self, k) is not None:
                b[k] = getattr(self, k)
        g = self.guidance_scale if self.guidance_scale is not None else guidance
        if g is not None:
            b["guidance_scale"] = g
        return b


@dataclasses.dataclass(frozen=True)
class RequestMix:
    classes: tuple = (RequestClass(),)

    def __post_init__(self):
        names = [c.name for c in self.classes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a mix needs one or more classes with distinct names, got {names}")

    @classmethod
    def parse(cls, data: dict) -> "RequestMix":
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise ValueError('a mix is a JSON object {"classes": [{"name": ..., "weight": ..., ...}, ...]}')
        out = []
        for i, c in enumerate(data["classes"]):
            if not isinstance(c, dict):
                raise ValueError(f"mix class {i} must be an object with keys among {', '.join(CLASS_KEYS)}")
            bad = sorted(set(c) - set(CLASS_KEYS))
            if bad:
                raise ValueError(f"mix class {i}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(CLASS_KEYS)}")
            out.append(RequestClass(**{"name": f"class{i}", **c}))
        return cls(tuple(out))

    @classmethod
    def load(cls, path) -> "RequestMix":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the mix file {path}: {e}") from None
        return cls.parse(data)

    def by_name(self, name: str) -> RequestClass:
        for c in self.classes:
            if c.name == name:
                return c
        raise ValueError(f"unknown class {name!r}; the mix has {', '.join(c.name for c in self.classes)}")

    def sample(self, count: int, seed: int) -> list:
        """``count`` classes drawn by weight (seeded)."""
        import numpy as np

        w = np.array([c.weight for c in self.classes], dtype=np.float64)
        picks = np.random.default_rng(seed).choice(len(self.classes), size=count, p=w / w.sum())
        return [self.classes[i] for i in picks]


def read_trace(path) -> list:
    """[(seconds, class name or None)] from a trace file, sorted by time."""
    out = []
    for k, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split("#")[0].split()
        if not parts:
            continue
        try:
            t = float(parts[0])
        except ValueError:
            t = math.nan
        if not math.isfinite(t) or t < 0 or len(parts) > 2:
            raise ValueError(f"{path}:{k}: write 'SECONDS [CLASS]' with SECONDS >= 0, got {line.strip()!r}")
        out.append((t, parts[1] if len(parts) == 2 else None))
    if not out:
        raise ValueError(f"{path} has no arrivals")
    return sorted(out, key=lambda x: x[0])


def arrivals(kind: str, rate: "float | None" = None, requests: "int | None" = None,
             duration_s: "float | None" = None, seed: int = 0):
    """Arrival times in seconds: ``poisson`` or ``constant`` at ``rate`` per second, bounded by ``requests`` and/or
    ``duration_s``."""
    import numpy as np

    if kind not in ("poisson", "constant"):
        raise ValueError(f"unknown arrivals {kind!r}; allowed: {', '.join(ARRIVALS)}")
    count = requests if requests is not None else int(math.ceil(rate * duration_s * 3 + 10))
    if kind == "poisson":
        times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=count))
    else:
        times = np.arange(count) / rate
    return [float(t) for t in times if duration_s is None or t <= duration_s]
