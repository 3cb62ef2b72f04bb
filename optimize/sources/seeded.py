"""Models drawn from a seed: each of a recipe's models from its own, so one built alone has the weights it has in the
whole pipeline (what lets a build read one component at a time)."""
from __future__ import annotations


def seeded(seed: int, make):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def made(makers: dict, only) -> dict:
    """Build the models named in ``only`` (all when None), in a fixed order."""
    unknown = set(only or ()) - set(makers)
    if unknown:
        raise KeyError(f"this pipeline has no {', '.join(sorted(unknown))}")
    return {k: make() for k, make in makers.items() if only is None or k in only}
