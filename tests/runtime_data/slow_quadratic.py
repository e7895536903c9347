"""The toy quadratic with a slowed-down upper objective, so a test can kill a run mid-way."""

import time

from problems.toy import quadratic_lower, quadratic_upper

lower = quadratic_lower


def upper(upper_view, lower_view, batch, delay=0.0, rho=0.1):
    time.sleep(delay)
    return quadratic_upper(upper_view, lower_view, batch, rho=rho)
