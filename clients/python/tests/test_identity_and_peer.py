"""Addresses (EIP-55, checked against eth-account when it is installed), the peer CLI's messages
and report, and that secrets stay out of representations."""

from __future__ import annotations

import json
import secrets

import pytest

from switchboard_client import ClientConfig
from switchboard_client.identity import InvalidAddress, address_of_user, keccak256, parse_address, to_checksum
from switchboard_client.peer import Report, index_of, message, percentile


def test_keccak_and_checksums_match_known_values() -> None:
    assert keccak256(b"").hex() == "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    assert to_checksum("0x5aaeb6053f3e94c9b9a09f33669435e7ef1beaed") == "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    eth_utils = pytest.importorskip("eth_utils")
    for _ in range(50):
        address = "0x" + secrets.token_hex(20)
        assert to_checksum(address) == eth_utils.to_checksum_address(address)


def test_addresses_are_parsed_as_discovery_does() -> None:
    good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    assert parse_address(good.lower()) == good
    assert parse_address("0x" + good[2:].upper()) == good
    for bad in ["0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD", "5aaeb6053f3e94c9b9a09f33669435e7ef1beaed", "0x12"]:
        with pytest.raises(InvalidAddress):
            parse_address(bad)
    assert address_of_user(f"@{good.lower()}:localhost") == good
    assert address_of_user("@alice:localhost") is None


def test_peer_messages_are_raiden_shaped_json_of_the_asked_size() -> None:
    for size in (10, 200, 3200):
        data = message(7, size)
        assert len(data) == max(size, len(message(7, 0)))
        assert json.loads(data)["type"] == "LockedTransfer"
        assert index_of(data) == 7
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 50) is None
    # The Rust peer's message, byte for byte (serde_json writes keys in order).
    rust = (
        '{"chain_id":"1","locked_amount":"1000000000000000","message_identifier":"3","nonce":"1",'
        '"transferred_amount":"0","type":"LockedTransfer","padding":"xx"}'
    )
    assert message(3, len(rust)) == rust.encode()


def test_the_report_is_the_documented_json_line() -> None:
    report = Report("relay", 12.5, {"p50": 0.5, "p99": 1.5}, 3, 3, 3)
    assert json.loads(report.json()) == {
        "path": "relay",
        "upgrade_ms": 12.5,
        "rtt_ms": {"p50": 0.5, "p99": 1.5},
        "sent": 3,
        "acknowledged": 3,
        "received": 3,
    }


def test_the_access_token_stays_out_of_representations() -> None:
    config = ClientConfig("http://127.0.0.1:8008", "syt_secret_token")
    assert "syt_secret_token" not in repr(config)
