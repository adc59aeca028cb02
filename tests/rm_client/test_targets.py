"""Reward-service addresses (rm_client/targets.py): a malformed one is refused at once, by the
parser and by every client built on it, naming the address and what is wrong; gRPC's own target
forms pass. No server: nothing is dialled. The trainer's scorer refuses them the same way:
tests/policy_trainer/test_scoring.py; the reward-function adapters: test_reward_fn.py."""

from __future__ import annotations

import re
import time

import pytest

from rm_client import AddressError, AsyncRewardClient, RewardClient, parse_targets


@pytest.mark.parametrize("address, why", [
    ("http://127.0.0.1:50051", "no http:// scheme"),
    ("localhost", "no port (gRPC would dial 443)"),
    ("127.0.0.1:5oo51", "not a number in 1..65535"),
    ("127.0.0.1:70000", "not a number in 1..65535"),
    ("127.0.0.1:65536", "not a number in 1..65535"),
    ("127.0.0.1:0", "not a number in 1..65535"),
    ("::1:50051", "IPv6 address goes in brackets"),
    ("[::1]", "no port (gRPC would dial 443)"),
    ("[nope]:50051", "is not an IPv6 address"),
    ("bad host:50051", "is not a host name or address"),
    ("unix:", "no socket path"),
    ("rm-0:50051,rm-1", "no port"),
])
def test_a_malformed_address_is_refused_at_construction(address, why):
    t0 = time.perf_counter()
    for make in (lambda: parse_targets(address), lambda: AsyncRewardClient(address),
                 lambda: RewardClient(address)):
        bad = address.split(",")[-1]
        with pytest.raises(AddressError, match=re.escape(f"'{bad}'") + ".*" + re.escape(why)):
            make()
    assert time.perf_counter() - t0 < 1.0  # at once, not after a minute of retries


def test_no_address_at_all_is_refused():
    for empty in ("", " , ", []):
        with pytest.raises(AddressError, match="no reward-model address given"):
            parse_targets(empty)


def test_grpc_target_forms_are_accepted():
    ok = ["127.0.0.1:50051", "rm-0.rm.svc.cluster.local:50051", "[::1]:50051",
          "dns:///rm:50051", "dns://10.0.0.2/rm:50051", "ipv4:127.0.0.1:50051",
          "ipv6:[::1]:50051", "unix:/run/rm.sock", "unix-abstract:rm"]
    assert parse_targets(ok) == ok
    assert parse_targets(" a:1, b:2 ,") == ["a:1", "b:2"]
