"""Loopback ports for servers this process is about to start (bench arms, `make demo`, the
rendezvous of `torch.distributed`, the tests' servers).

The usual way, binding port 0 and closing the socket, takes a port from the kernel's ephemeral
range (`net.ipv4.ip_local_port_range`), the same range every outgoing connection on the machine
draws its source port from: between the close and the server's own bind, another process's
connection can take it. Here a port is drawn at random from below that range, where the kernel
never hands ports out by itself, and kept only if it can be bound now; with many processes
drawing at once (two pytest-xdist workers), a random draw from thousands of ports makes a clash
unlikely rather than relying on the kernel's next ephemeral port.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # below: ports that well-known services are more likely to hold


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_range(n: int = 1, host: str = "127.0.0.1") -> tuple[int, int]:
    """First and last of `n` consecutive ports that are free on `host` now."""
    high = ephemeral_low()
    rng = random.SystemRandom()
    if high - LOWEST > 4 * n:
        for _ in range(200):
            lo = rng.randrange(LOWEST, high - n)
            if all(_bindable(p, host) for p in range(lo, lo + n)):
                return lo, lo + n - 1
    for _ in range(50):  # a machine whose ephemeral range starts low: the kernel's own choice
        with socket.socket() as s:
            s.bind((host, 0))
            lo = s.getsockname()[1]
        if lo + n <= 65536 and all(_bindable(p, host) for p in range(lo, lo + n)):
            return lo, lo + n - 1
    raise RuntimeError(f"no {n} consecutive free ports on {host}")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now (see the module's docstring)."""
    return free_port_range(1, host)[0]
