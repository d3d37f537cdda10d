"""Placement as a pure function: filters, resource fit, spread/binpack, ports."""

from __future__ import annotations

from specserve.cluster.scheduler import GiB, Placement, WorkerView, estimate, place


def view(id: int, **kw) -> WorkerView:
    base = dict(id=id, name=f"w{id}", ip="10.0.0.1", ready=True, labels={}, ram_free=16 * GiB,
                gpus_free=(), replicas_of_model=0, ports_used=frozenset(),
                port_range=(40000, 40003), checkpoint_size=1 * GiB)  # fmt: skip
    return WorkerView(**{**base, **kw})


def test_estimate_adds_overhead_to_checkpoint_size() -> None:
    ram, vram = estimate(10 * GiB, "cpu")
    assert vram == 0 and ram > 12 * GiB
    ram, vram = estimate(10 * GiB, "cuda")
    assert vram == 12 * GiB and ram < GiB


def test_spread_prefers_fewest_replicas_binpack_least_room() -> None:
    a = view(1, replicas_of_model=1, ram_free=64 * GiB)
    b = view(2, replicas_of_model=0, ram_free=8 * GiB)
    assert place([a, b], "cpu", {}, "spread").worker_id == 2
    assert place([a, b], "cpu", {}, "binpack").worker_id == 2
    c = view(3, replicas_of_model=0, ram_free=32 * GiB)
    assert place([a, c, b], "cpu", {}, "spread").worker_id == 3  # tie on replicas: most room
    assert place([a, c, b], "cpu", {}, "binpack").worker_id == 2


def test_filters_explain_every_rejection() -> None:
    workers = [
        view(1, ready=False),
        view(2, labels={"zone": "b"}),
        view(3, checkpoint_size=None),
        view(4, ram_free=GiB),
        view(5, ports_used=frozenset(range(40000, 40004))),
    ]
    msg = place(workers, "cpu", {"zone": "a"}, "spread")
    assert isinstance(msg, str) and msg.startswith("no worker fits")
    for expected in ("w1: not ready", "w2: labels do not match", "w4: labels do not match"):
        assert expected in msg
    msg = place(workers[2:], "cpu", {}, "spread")
    assert "w3: model path not found" in msg
    assert "w4: needs 1.45 GiB RAM, 1.00 GiB allocatable" in msg
    assert "w5: no free port in 40000-40003" in msg
    assert place([], "cpu", {}, "spread") == "no worker fits: no workers registered"


def test_cuda_needs_gpus_and_takes_enough_of_them() -> None:
    assert "no GPU" in place([view(1)], "cuda", {}, "spread")
    w = view(1, gpus_free=((0, 4 * GiB), (1, 8 * GiB), (2, 8 * GiB)), checkpoint_size=10 * GiB)
    p = place([w], "cuda", {}, "spread")
    assert isinstance(p, Placement) and p.gpu_ids == (1, 2) and p.vram == 12 * GiB
    small = view(1, gpus_free=((0, 4 * GiB),), checkpoint_size=10 * GiB)
    assert "VRAM" in place([small], "cuda", {}, "spread")


def test_port_is_lowest_free_in_range() -> None:
    p = place([view(1, ports_used=frozenset({40000, 40002}))], "cpu", {}, "spread")
    assert p.port == 40001
