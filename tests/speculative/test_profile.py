"""SPS table interpolation, persistence and profiling."""

import time

import pytest

from specserve.speculative.profile import SPSTable, profile_sps

TABLE = SPSTable((1, 4, 8), (100.0, 40.0, 20.0))


def test_interpolation_between_points_and_flat_beyond_ends():
    assert TABLE(1) == 100.0
    assert TABLE(4) == 40.0
    assert TABLE(2) == pytest.approx(80.0)  # 100 + (1/3)(40 - 100)
    assert TABLE(6) == pytest.approx(30.0)  # halfway 4 -> 8
    assert TABLE(0) == 100.0
    assert TABLE(1000) == 20.0


def test_single_point_table_is_flat():
    single = SPSTable((5,), (3.0,))
    assert [single(b) for b in (1, 2, 5, 9)] == [3.0] * 4


@pytest.mark.parametrize(
    "b, s, match",
    [
        ((), (), "non-zero number"),
        ((1, 2), (1.0,), "same non-zero number"),
        ((2, 2), (1.0, 1.0), "strictly ascending"),
        ((0, 2), (1.0, 1.0), "positive"),
        ((1, 2), (1.0, -1.0), "positive and finite"),
        ((1, 2), (1.0, float("inf")), "positive and finite"),
    ],
)
def test_constructor_rejects_bad_tables(b, s, match):
    with pytest.raises(ValueError, match=match):
        SPSTable(b, s)


def test_save_load_roundtrip(tmp_path):
    path = tmp_path / "sps.json"
    TABLE.save(path)
    assert SPSTable.load(path) == TABLE
    assert SPSTable.load(str(path))(6) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "text, match",
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "need keys"),
        ('{"batch_tokens": [1, 2]}', "need keys"),
        ('{"batch_tokens": [1, 2.5], "steps_per_second": [1, 2]}', "list of integers"),
        ('{"batch_tokens": [1, 2], "steps_per_second": ["a", 2]}', "list of numbers"),
        ('{"batch_tokens": [2, 1], "steps_per_second": [1, 2]}', "strictly ascending"),
    ],
)
def test_load_bad_file_names_the_file(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        SPSTable.load(path)
    assert "bad.json" in str(info.value)


def test_profile_sps_uses_the_fastest_run_and_skips_warmup():
    durations = {1: [100.0, 0.020, 0.030, 0.010], 4: [100.0, 0.05, 0.04, 0.2]}
    now = [0.0]
    calls = []

    def step(b: int) -> None:
        now[0] += durations[b][sum(1 for c in calls if c == b)]
        calls.append(b)

    table = profile_sps(step, [4, 1, 4], repeats=3, warmup=1, clock=lambda: now[0])
    assert calls == [1] * 4 + [4] * 4
    assert table.batch_tokens == (1, 4)
    assert table.steps_per_second == pytest.approx((100.0, 25.0))


def _scripted(durations: dict[int, list[float]]):
    """A step function whose n-th run at size B takes durations[B][n] on a fake clock;
    -> (step, clock, runs per size)."""
    now, counts = [0.0], dict.fromkeys(durations, 0)

    def step(b: int) -> None:
        now[0] += durations[b][counts[b]]
        counts[b] += 1

    return step, lambda: now[0], counts


def test_profile_sps_never_lets_a_larger_batch_be_faster():
    # B=1 caught a slow moment on every run; B=2 did not: B=2 must not look cheaper than B=1
    step, clock, _ = _scripted({1: [0.020, 0.020], 2: [0.010, 0.011], 8: [0.030, 0.030]})
    table = profile_sps(step, [1, 2, 8], repeats=2, warmup=0, clock=clock)
    assert table.steps_per_second == pytest.approx((50.0, 50.0, 1 / 0.030))


def test_profile_sps_times_again_a_size_slower_than_a_larger_one():
    """B=2 caught contention on all three runs (0.3 s where B=8 takes 0.03 s): it is timed
    again instead of flattening the table up to B=8 to 3.3 steps/s."""
    step, clock, counts = _scripted({1: [0.01] * 3, 2: [0.3] * 4 + [0.012, 0.3], 8: [0.03] * 3})
    table = profile_sps(step, [1, 2, 8], repeats=3, warmup=0, clock=clock)
    assert counts == {1: 3, 2: 6, 8: 3}  # one more round of B=2, then it was below 2 x B=8
    assert table.steps_per_second == pytest.approx((100.0, 1 / 0.012, 1 / 0.03))


def test_profile_sps_with_real_time():
    table = profile_sps(lambda b: time.sleep(0.001 * b), [1, 20], repeats=3, warmup=0)
    assert table.steps_per_second[0] > table.steps_per_second[1]
    assert table.steps_per_second[1] <= 1 / 0.020


def test_profile_sps_checks_arguments():
    with pytest.raises(ValueError, match="repeats"):
        profile_sps(lambda b: None, [1], repeats=0)
