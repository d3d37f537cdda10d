"""Ports for servers about to start: outside the kernel's ephemeral range, free when chosen."""

from __future__ import annotations

import socket

from specserve import ports


def _bind(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_ports_come_from_below_the_ephemeral_range_and_are_free():
    low = ports.ephemeral_low()
    seen = set()
    for _ in range(20):
        lo, hi = ports.free_port_range(4)
        assert hi == lo + 3 and ports.LOWEST <= lo and hi < low
        for p in range(lo, hi + 1):
            _bind(p)  # raises if taken
        seen.add(lo)
    assert len(seen) > 1  # drawn at random, not the same port every time
    assert ports.LOWEST <= ports.free_port() < low


def test_a_taken_port_is_not_handed_out(monkeypatch):
    taken, free = ports.free_port(), ports.free_port()
    if free == taken:
        free = ports.free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", taken))
        draws = iter([taken, free])  # the first draw hits the held port
        monkeypatch.setattr(ports.random.SystemRandom, "randrange", lambda self, a, b: next(draws))
        assert ports.free_port() == free


def test_without_room_below_the_ephemeral_range_the_kernel_chooses(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_low", lambda: ports.LOWEST + 2)
    lo, hi = ports.free_port_range(3)
    assert hi == lo + 2
    for p in range(lo, hi + 1):
        _bind(p)
