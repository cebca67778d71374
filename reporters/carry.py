"""Exact totals to Stripe's whole units, with the part below one unit carried, never rounded.

Stripe takes whole numbers only. For a ``sum`` meter we keep, per (customer, meter), the exact
total accounted so far (over windows: each window's total at its newest ledger row) and the
whole units issued so far. A changed window W whose total goes from P to T sends::

    value = floor((accounted - P + T) * unit_scale) - units_issued

so after every report ``units_issued == floor(accounted * unit_scale)``: Stripe's total is the
floor of the exact total, the fraction is carried to the next report (in any window), and no
unit is invented. Floors round toward minus infinity, negatives included, in a local decimal
context wide enough that no product is rounded.

A ``last`` meter reports the current value, floored the same way; nothing is carried.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import (
    ROUND_FLOOR,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)

from meterstream.meters import StripeFormula

# 60 digits hold any NUMERIC total times any unit_scale we accept without rounding; Inexact is
# trapped so that, were that ever false, we raise instead of billing a rounded number. Its
# flags (set by every thread that computes through it) are never read: a trap raises on the
# operation that signals it, whatever the flags hold.
_EXACT = Context(
    prec=60, rounding=ROUND_FLOOR, traps=[Inexact, InvalidOperation, DivisionByZero, Overflow]
)


def whole_units(total: Decimal, unit_scale: Decimal) -> int:
    """floor(total * unit_scale), exact; -0.5 gives -1."""
    with localcontext(_EXACT):
        return _whole_units(total, unit_scale)


def _whole_units(total: Decimal, unit_scale: Decimal) -> int:
    """whole_units, for a caller already in ``localcontext(_EXACT)`` (one context per report:
    entering one copies the context, a measurable part of a ledger row's CPU)."""
    return int((total * unit_scale).to_integral_value(rounding=ROUND_FLOOR))


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The sum, without the default context's 28-digit rounding."""
    with localcontext(_EXACT):
        return sum(values, Decimal(0))


@dataclass(frozen=True, slots=True)
class Account:
    """The running totals of one (customer, meter): exact total accounted, whole units issued."""

    accounted_total: Decimal = Decimal(0)
    units_total: int = 0

    def carried(self, unit_scale: Decimal) -> Decimal:
        """The fraction of a unit accounted but not yet issued (0 <= carried < 1)."""
        with localcontext(_EXACT):
            return self.accounted_total * unit_scale - self.units_total


@dataclass(frozen=True, slots=True)
class Report:
    """What one changed window sends, and the account after it."""

    value: int
    account: Account


def report(
    formula: StripeFormula,
    account: Account,
    previous_total: Decimal,
    new_total: Decimal,
    unit_scale: Decimal,
) -> Report:
    """The value to send for a window whose exact total went from ``previous_total`` (0 for a
    window never reported) to ``new_total``; see the module docstring.

    The context's own methods, not ``localcontext``: entering one copies the context, a third
    of this function's time, and a ledger row is written per call."""
    if formula == "last":
        value = _floor(_EXACT.multiply(new_total, unit_scale))
        return Report(value, Account(new_total, value))
    accounted = _EXACT.add(_EXACT.subtract(account.accounted_total, previous_total), new_total)
    units = _floor(_EXACT.multiply(accounted, unit_scale))
    return Report(units - account.units_total, Account(accounted, units))


def _floor(value: Decimal) -> int:
    """floor(value) of an exact product (to_integral_value never rounds away a digit that
    counts: it is the floor, by definition)."""
    return int(value.to_integral_value(rounding=ROUND_FLOOR, context=_EXACT))
