"""Raiden addresses: parsing and EIP-55 checksums (Keccak-256, implemented here so the package needs
nothing beyond aiortc and aiohttp), and the user id an address has on a homeserver."""

from __future__ import annotations

import re

_RC = [
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000,
    0x000000000000808B, 0x0000000080000001, 0x8000000080008081, 0x8000000000008009,
    0x000000000000008A, 0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089, 0x8000000000008003,
    0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
]  # fmt: skip
_ROT = [
    [0, 36, 3, 41, 18], [1, 44, 10, 45, 2], [62, 6, 43, 15, 61], [28, 55, 25, 21, 56], [27, 20, 39, 8, 14],
]  # fmt: skip
_MASK = (1 << 64) - 1


def _rol(x: int, n: int) -> int:
    return ((x << n) | (x >> (64 - n))) & _MASK if n else x


def _keccak_f(a: list[list[int]]) -> None:
    for rc in _RC:
        c = [a[x][0] ^ a[x][1] ^ a[x][2] ^ a[x][3] ^ a[x][4] for x in range(5)]
        d = [c[(x - 1) % 5] ^ _rol(c[(x + 1) % 5], 1) for x in range(5)]
        for x in range(5):
            for y in range(5):
                a[x][y] ^= d[x]
        b = [[0] * 5 for _ in range(5)]
        for x in range(5):
            for y in range(5):
                b[y][(2 * x + 3 * y) % 5] = _rol(a[x][y], _ROT[x][y])
        for x in range(5):
            for y in range(5):
                a[x][y] = b[x][y] ^ ((~b[(x + 1) % 5][y]) & b[(x + 2) % 5][y])
        a[0][0] ^= rc


def keccak256(data: bytes) -> bytes:
    """Keccak-256 as Ethereum uses it (the original padding, not SHA3-256's)."""
    rate = 136
    padded = bytearray(data) + b"\x01"
    padded += bytes(-len(padded) % rate)
    padded[-1] |= 0x80
    state = [[0] * 5 for _ in range(5)]
    for block in range(0, len(padded), rate):
        for i in range(rate // 8):
            lane = int.from_bytes(padded[block + 8 * i : block + 8 * i + 8], "little")
            state[i % 5][i // 5] ^= lane
        _keccak_f(state)
    out = b"".join(state[i % 5][i // 5].to_bytes(8, "little") for i in range(4))
    return out


_HEX40 = re.compile(r"^0x[0-9a-fA-F]{40}$")


class InvalidAddress(ValueError):
    """Not a Raiden address (0x + 40 hex digits, all lower, all upper or checksummed)."""


def to_checksum(address: str) -> str:
    """The EIP-55 form of a 0x-address (its case not checked)."""
    lower = address[2:].lower()
    digest = keccak256(lower.encode()).hex()
    return "0x" + "".join(c.upper() if int(h, 16) >= 8 else c for c, h in zip(lower, digest[:40], strict=True))


def parse_address(address: str) -> str:
    """The checksummed address; raises :class:`InvalidAddress` as the protocol's Discovery does."""
    if not isinstance(address, str) or not _HEX40.match(address):
        raise InvalidAddress(f"not an address: {address!r}")
    body = address[2:]
    checksummed = to_checksum(address)
    if body not in (body.lower(), body.upper()) and checksummed != address:
        raise InvalidAddress(f"bad checksum: {address!r}")
    return checksummed


def address_of_user(user_id: str) -> str | None:
    """The address a Raiden user id claims by its localpart (``@0x…:server``), checksummed."""
    if not user_id.startswith("@") or ":" not in user_id:
        return None
    localpart = user_id[1:].split(":", 1)[0]
    try:
        return parse_address(localpart)
    except InvalidAddress:
        return None
