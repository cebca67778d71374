"""What the kernel says is listening: the addresses a server really bound, not what it printed."""

from __future__ import annotations

import ipaddress
from pathlib import Path

_LISTEN = "0A"


def listening_hosts(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (Linux /proc/net/tcp{,6})."""
    found: set[str] = set()
    for table, width in (("tcp", 4), ("tcp6", 16)):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port or fields[3] != _LISTEN:
                continue
            # The kernel prints each 32-bit word of the address in host (little-endian) order.
            raw = bytes.fromhex(address)
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            found.add(str(ipaddress.ip_address(words)))
    return found
