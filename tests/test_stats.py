import pytest

from refusal.stats import format_rate, wilson_interval


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(12, 20)
    assert lo == pytest.approx(0.3866, abs=1e-4) and hi == pytest.approx(0.7812, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert format_rate(12, 20) == "12/20 (60%, 95% CI 39%-78%)"
