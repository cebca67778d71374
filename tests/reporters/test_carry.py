"""Pure parts of the reporter: unit conversion with carry, identifiers, the token pacer."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from reporters.carry import Account, exact_sum, report, whole_units
from reporters.ledger import identifier_for
from reporters.pacer import Pacer


def _send_all(totals: list[tuple[int, str]], scale: str = "1") -> list[int]:
    """Report (window, new total) changes in order; the values Stripe is sent."""
    account, values = Account(), []
    reported: dict[int, Decimal] = {}
    for window, total in totals:
        outcome = report(
            "sum", account, reported.get(window, Decimal(0)), Decimal(total), Decimal(scale)
        )
        account, reported[window] = outcome.account, Decimal(total)
        values.append(outcome.value)
    return values


def test_fractions_are_carried_across_windows_never_rounded() -> None:
    assert _send_all([(1, "0.4"), (2, "0.4"), (3, "0.4")]) == [0, 0, 1]


def test_unit_scale_1000_sends_whole_units_and_carries_the_rest() -> None:
    assert _send_all([(1, "1.2345"), (2, "0.0005")], scale="1000") == [1234, 1]


def test_a_correction_sends_the_difference_of_the_window() -> None:
    assert _send_all([(1, "10"), (2, "3"), (1, "12.5"), (1, "7")]) == [10, 3, 2, -5]


def test_floors_go_toward_minus_infinity_for_negatives() -> None:
    assert whole_units(Decimal("-0.5"), Decimal(1)) == -1
    assert whole_units(Decimal("-2"), Decimal(1)) == -2
    assert whole_units(Decimal("0.999"), Decimal(1000)) == 999


def test_sum_sent_always_equals_floor_of_exact_total() -> None:
    rng = random.Random(7)
    scale = Decimal("1000")
    account, sent = Account(), 0
    reported: dict[int, Decimal] = {}
    for _ in range(2_000):
        window = rng.randrange(20)
        total = Decimal(rng.randrange(-50_000, 10**9)) / Decimal(10 ** rng.randrange(0, 9))
        outcome = report("sum", account, reported.get(window, Decimal(0)), total, scale)
        account, reported[window] = outcome.account, total
        sent += outcome.value
        assert sent == whole_units(exact_sum(reported.values()), scale)
        assert Decimal(0) <= account.carried(scale) < 1


def test_last_formula_sends_the_current_value_floored() -> None:
    outcome = report("last", Account(Decimal(5), 5), Decimal(5), Decimal("7.9"), Decimal(1))
    assert outcome.value == 7


def test_exact_sum_keeps_more_than_28_digits() -> None:
    big = Decimal("123456789012345678901234567890.123456789")
    assert exact_sum([big, Decimal("0.000000001")]) == Decimal(
        "123456789012345678901234567890.123456790"
    )


def test_identifier_is_deterministic_short_and_distinct_per_revision() -> None:
    start = datetime(2026, 11, 24, tzinfo=UTC)
    end = start + timedelta(hours=1)
    longest = "d" * 32  # the longest METERSTREAM_DEPLOYMENT_ID allowed
    first = identifier_for("customer-" + "x" * 190, "tokens", start, end, 1, deployment_id=longest)
    again = identifier_for("customer-" + "x" * 190, "tokens", start, end, 1, deployment_id=longest)
    assert first == again
    assert len(first) <= 100
    assert first != identifier_for(
        "customer-" + "x" * 190, "tokens", start, end, 2, deployment_id=longest
    )
    assert first != identifier_for(
        "customer-" + "x" * 190, "tokens", start, end, 1, deployment_id="other"
    )


class _FakeTime:
    def __init__(self) -> None:
        self.now_s = 100.0

    def clock(self) -> float:
        return self.now_s

    def wait(self, seconds: float) -> bool:
        self.now_s += seconds
        return False


def test_pacer_spaces_calls_to_the_rate() -> None:
    fake = _FakeTime()
    pacer = Pacer(5.0, clock=fake.clock, wait=fake.wait)
    moments = []
    for _ in range(11):
        assert pacer.acquire()
        moments.append(fake.now_s)
    # 11 calls at 5/s take 2 s: no one-second window ever holds more than 5 calls.
    assert round(moments[-1] - moments[0], 9) == 2.0
    assert all(sum(1 for m in moments if t <= m < t + 0.999) <= 5 for t in moments)


def test_pacer_wait_cut_short_by_a_stop() -> None:
    fake = _FakeTime()
    pacer = Pacer(1.0, clock=fake.clock, wait=lambda _s: True)
    assert pacer.acquire()
    assert not pacer.acquire()
