"""The failure budgets on their own (sidecar.gate.buckets; docs/reference/status-codes.md,
Failure budgets): what holds, failures and fresh networks do to an attempt's chances."""

from __future__ import annotations

import pytest

from sidecar.gate.buckets import FailureBudgets, client_network


@pytest.mark.parametrize(("address", "network"), [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("unknown", "unknown"),
])
def test_a_client_network_is_an_ipv4_address_or_an_ipv6_slash_64(address: str, network: str) -> None:
    assert client_network(address) == network


def test_held_units_make_an_attempt_wait_but_never_refuse_it() -> None:
    budgets = FailureBudgets(per_address=2, per_lookup_and_network=100, per_lookup=100)
    assert budgets.try_hold("10.0.0.1", "LookupA1")
    assert budgets.try_hold("10.0.0.1", "LookupB1")
    # Both units held: the third must wait, but nothing refuses it.
    assert budgets.refusal("10.0.0.1", "LookupC1") is None
    assert not budgets.try_hold("10.0.0.1", "LookupC1")
    budgets.release("10.0.0.1", "LookupA1", failed=False)  # a valid key gives its unit back
    assert budgets.try_hold("10.0.0.1", "LookupC1")


def test_a_failed_attempt_spends_its_held_unit_in_the_same_step() -> None:
    budgets = FailureBudgets(per_address=1, per_lookup_and_network=100, per_lookup=100)
    assert budgets.try_hold("10.0.0.1", "LookupA1")
    budgets.release("10.0.0.1", "LookupA1", failed=True)
    wait = budgets.refusal("10.0.0.1", "LookupB1")
    assert wait is not None and wait >= 1
    assert not budgets.try_hold("10.0.0.1", "LookupB1")
    assert budgets.refusal("10.0.0.2", "LookupB1") is None  # another client is not affected


def test_a_lookup_ids_total_cap_binds_only_networks_that_failed_against_it() -> None:
    budgets = FailureBudgets(per_address=100, per_lookup_and_network=100, per_lookup=2)
    budgets.record_failure("10.0.0.1", "LookupA1")
    budgets.record_failure("10.0.0.1", "LookupA1")
    assert budgets.refusal("10.0.0.1", "LookupA1") is not None
    # A network with no failure against it is verified (it may be the holder), once at a time.
    assert budgets.refusal("10.0.0.2", "LookupA1") is None
    assert budgets.try_hold("10.0.0.2", "LookupA1")
    assert not budgets.try_hold("10.0.0.2", "LookupA1")
    budgets.release("10.0.0.2", "LookupA1", failed=True)
    assert budgets.refusal("10.0.0.2", "LookupA1") is not None
    # Other lookup ids are not affected.
    assert budgets.refusal("10.0.0.1", "LookupB1") is None


def test_per_network_budget_of_a_lookup_id_does_not_spill_to_other_networks() -> None:
    budgets = FailureBudgets(per_address=100, per_lookup_and_network=2, per_lookup=100)
    for _ in range(2):
        budgets.record_failure("10.0.0.1", "LookupA1")
    assert budgets.refusal("10.0.0.1", "LookupA1") is not None
    assert budgets.refusal("10.0.0.2", "LookupA1") is None


def test_forgetting_a_lookup_id_clears_its_budgets_from_every_network() -> None:
    budgets = FailureBudgets(per_address=100, per_lookup_and_network=1, per_lookup=1)
    budgets.record_failure("10.0.0.1", "LookupA1")
    budgets.record_failure("10.0.0.2", "LookupA1")
    budgets.record_failure("10.0.0.2", "LookupA10")  # a lookup id that starts the same
    budgets.forget("LookupA1")
    assert budgets.refusal("10.0.0.1", "LookupA1") is None
    assert budgets.refusal("10.0.0.2", "LookupA1") is None
    assert budgets.refusal("10.0.0.2", "LookupA10") is not None
