"""Counter-based draws: SplitMix64 bit for bit, one stream per seed, uniform in [0, 1)."""

from __future__ import annotations

import numpy as np
import pytest

from lmcore.draws import Draws, next_uniforms

pytestmark = pytest.mark.unit

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def splitmix64_mix(z: int) -> int:
    """The reference output function, in Python integers (no numpy, no wrap-around to trust)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_uniforms(seed: int, n: int) -> list[float]:
    state = splitmix64_mix(seed & MASK)
    return [(splitmix64_mix((state + k * GAMMA) & MASK) >> 11) / 2.0**53 for k in range(1, n + 1)]


def test_the_reference_gives_splitmix64s_published_outputs() -> None:
    # The first outputs of SplitMix64 from state 1234567, as in the reference implementation's
    # test vectors (also used by Rust's rand_xoshiro).
    outputs = [splitmix64_mix((1234567 + k * GAMMA) & MASK) for k in range(1, 6)]
    assert outputs == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                       4593380528125082431, 16408922859458223821]  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 7, 2**63 + 5, MASK, -1, -12345])
def test_draws_are_splitmix64_of_the_hashed_seed_bit_for_bit(seed: int) -> None:
    stream = Draws(seed)
    got = [float(next_uniforms([stream])[0]) for _ in range(50)]
    assert got == reference_uniforms(seed, 50)
    assert stream.taken == 50


def test_a_stream_draws_the_same_numbers_whatever_else_is_drawn_with_it() -> None:
    alone = Draws(42)
    alone_values = [float(next_uniforms([alone])[0]) for _ in range(6)]
    together = Draws(42)
    values = []
    for step in range(6):
        others = [Draws(s) for s in range(step)]  # a batch of a different size every step
        batch = [*others[: step // 2], together, *others[step // 2 :]]
        values.append(float(next_uniforms(batch)[step // 2]))
    assert values == alone_values


def test_a_stream_without_a_seed_starts_somewhere_new_each_time() -> None:
    firsts = {float(next_uniforms([Draws()])[0]) for _ in range(20)}
    assert len(firsts) == 20


def test_seeds_one_increment_apart_are_not_shifted_copies() -> None:
    # SplitMix64 started straight at the seed would give seed + GAMMA the stream of seed, one
    # draw ahead; hashing the seed first breaks that.
    first, second = Draws(3), Draws(3 + GAMMA)
    ahead = [float(next_uniforms([first])[0]) for _ in range(9)][1:]
    other = [float(next_uniforms([second])[0]) for _ in range(8)]
    assert ahead != other


def test_draws_are_uniform_in_the_unit_interval() -> None:
    streams = [Draws(seed) for seed in range(1000)]
    values = np.concatenate([next_uniforms(streams) for _ in range(200)])  # 200,000 draws
    assert values.min() >= 0.0 and values.max() < 1.0
    counts = np.bincount((values * 100).astype(int), minlength=100)
    chi2 = float(((counts - 2000.0) ** 2 / 2000.0).sum())
    assert chi2 < 148.2, chi2  # the 99.9th percentile of chi-square with 99 degrees of freedom
    # Successive draws of one stream are not correlated with each other.
    one = np.array([next_uniforms([streams[0]])[0] for _ in range(20_000)])
    assert abs(np.corrcoef(one[:-1], one[1:])[0, 1]) < 0.03
