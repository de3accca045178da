"""Counter-based random draws: a request's n-th uniform is a pure function of (seed, n).

The sampler needs one uniform number per sampled request and step. From a torch.Generator per
request that was one call per request, and on a GPU one kernel launch each (32 a step at 32
requests). Here the draws of a whole batch come from one vectorised hash on the host (SplitMix64:
Steele, Lea and Flood, OOPSLA 2014) and reach the device in the copy that carries the other
sampling parameters. A request draws the same numbers on any device, in any batch, in any order.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment: 2^64 over the golden ratio
_TO_UNIT = 2.0**-53  # 53 random bits -> a double in [0, 1)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64s: a bijection in which every bit moves every bit.

    numpy's uint64 arithmetic on arrays wraps modulo 2^64, which is what the hash needs.
    """
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Draws:
    """One request's stream of uniforms in [0, 1): SplitMix64 started at a hash of the seed.

    The seed goes through the hash first, so nearby seeds (1, 2, 3) start far apart on the
    generator's cycle of 2^64. Without a seed the stream starts at a random point.
    """

    __slots__ = ("state", "taken")

    def __init__(self, seed: int | None = None) -> None:
        start = secrets.randbits(64) if seed is None else seed & _MASK64
        self.state = int(_mix(np.array([start], dtype=np.uint64))[0])
        self.taken = 0  # draws handed out so far

    def __repr__(self) -> str:
        return f"Draws(state={self.state:#018x}, taken={self.taken})"


def next_uniforms(streams: Sequence[Draws]) -> np.ndarray:
    """The next uniform of each stream, float64 (len(streams),); each stream moves on by one."""
    n = len(streams)
    states = np.fromiter((s.state for s in streams), np.uint64, n)
    taken = np.fromiter((s.taken for s in streams), np.uint64, n)
    for stream in streams:
        stream.taken += 1
    bits = _mix(states + (taken + np.uint64(1)) * _GAMMA)
    return (bits >> np.uint64(11)).astype(np.float64) * _TO_UNIT
