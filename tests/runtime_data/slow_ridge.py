"""The ridge toy with a slowed-down upper objective, so a test can kill a data-parallel run mid-way."""

import time

from problems.toy import ridge_lower, ridge_upper

lower = ridge_lower


def upper(upper_view, lower_view, batch, delay=0.0):
    time.sleep(delay)
    return ridge_upper(upper_view, lower_view, batch)
