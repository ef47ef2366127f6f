"""The hybrid logical clock: strictly increasing, past everything observed, drift-bounded."""

from __future__ import annotations

from hypothesis import given, strategies as st

from workers.prevalence import clock
from workers.prevalence.clock import HybridClock

from tests.support import FakeClock


def test_tick_follows_the_wall_clock_when_it_moves_forward():
    wall = FakeClock(1_000)
    c = HybridClock(now_ms=wall)
    assert c.tick() == clock.from_ms(1_000)
    wall.ms = 2_000
    assert c.tick() == clock.from_ms(2_000)
    assert clock.physical_ms(c.last) == 2_000


def test_tick_is_strictly_increasing_when_the_wall_clock_goes_backwards():
    wall = FakeClock(5_000)
    c = HybridClock(now_ms=wall)
    first = c.tick()
    wall.ms = 1_000  # NTP stepped the clock back four seconds
    ticks = [c.tick() for _ in range(5)]
    assert all(b > a for a, b in zip([first] + ticks, ticks))
    assert clock.physical_ms(ticks[-1]) == 5_000  # physical part holds; the counter moves


def test_tick_is_strictly_increasing_when_the_wall_clock_stands_still():
    c = HybridClock(now_ms=FakeClock(7))
    ticks = [c.tick() for _ in range(1000)]
    assert ticks == sorted(set(ticks))


@given(st.lists(st.one_of(st.tuples(st.just("wall"), st.integers(0, 10 ** 6)),
                          st.tuples(st.just("observe"), st.integers(0, clock.from_ms(10 ** 6))),
                          st.tuples(st.just("tick"), st.just(0))), max_size=60))
def test_every_tick_is_above_every_tick_and_observation_before_it(ops):
    wall = FakeClock(0)
    c = HybridClock(now_ms=wall)
    high = 0
    for op, value in ops:
        if op == "wall":
            wall.ms = value
        elif op == "observe":
            c.observe(value)
            high = max(high, value)
        else:
            t = c.tick()
            assert t > high
            assert t >= clock.from_ms(wall.ms)
            high = t


def test_observe_moves_the_clock_past_a_later_reading_and_ignores_an_earlier_one():
    c = HybridClock(now_ms=FakeClock(1_000))
    c.observe(clock.from_ms(9_000) + 3)
    assert c.last == clock.from_ms(9_000) + 3
    c.observe(clock.from_ms(2_000))
    assert c.last == clock.from_ms(9_000) + 3
    assert c.tick() == clock.from_ms(9_000) + 4


def test_too_far_ahead_measures_the_excess_beyond_the_allowed_drift():
    wall = FakeClock(100_000)
    c = HybridClock(now_ms=wall, drift_max_ms=60_000)
    assert c.too_far_ahead(clock.from_ms(100_000)) == 0
    assert c.too_far_ahead(clock.from_ms(160_000) + 0xFFFF) == 0
    assert c.too_far_ahead(clock.from_ms(160_001)) == 1
    assert c.too_far_ahead(clock.from_ms(165_000)) == 5_000
    wall.ms = 105_000  # real time catches up: the same reading becomes acceptable
    assert c.too_far_ahead(clock.from_ms(165_000)) == 0


def test_a_wall_clock_off_the_reference_is_replaced_by_it_and_reported():
    wall, ref = FakeClock(10_000_000), FakeClock(10_000_000)
    c = HybridClock(now_ms=wall, drift_max_ms=1_000, reference_ms=ref)
    assert c.tick() == clock.from_ms(10_000_000) and c.skew_ms == 0
    wall.ms += 500                              # within the drift: the wall clock counts
    assert clock.physical_ms(c.tick()) == 10_000_500 and c.skew_ms == 0
    wall.ms += 86_400_000                       # a day ahead: the reference counts
    assert clock.physical_ms(c.tick()) == 10_000_500 and c.skew_ms == 86_400_500
    assert c.too_far_ahead(clock.from_ms(10_000_000 + 1_500)) == 500
    wall.ms = ref.ms                            # corrected
    c.tick()
    assert c.skew_ms == 0


def test_a_reference_not_measured_yet_leaves_the_wall_clock_alone():
    c = HybridClock(now_ms=FakeClock(5_000), reference_ms=lambda: None)
    assert c.tick() == clock.from_ms(5_000) and c.skew_ms == 0
