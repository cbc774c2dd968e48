import pytest

from refusal.measure.stats import format_rate, rate_values, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(12, 20)
    assert lo == pytest.approx(0.3866, abs=1e-4) and hi == pytest.approx(0.7812, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert format_rate(12, 20) == "12/20 (60%, 95% CI 39%-78%)"


def test_rate_values_prefers_stored_fields_and_computes_missing_ones():
    assert rate_values({"refused": 1, "total": 4, "rate": 0.25, "low": 0.1, "high": 0.9}) == (0.25, 0.1, 0.9)
    rate, low, high = rate_values({"refused": 12, "total": 20})
    assert rate == 0.6 and (low, high) == wilson_interval(12, 20)
    assert rate_values({"refused": 0, "total": 0}) == (0.0, 0.0, 1.0)
