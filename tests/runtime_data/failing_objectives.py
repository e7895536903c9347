"""The toy quadratic's upper objective, failing from its call ``after`` on: raising, or returning
a value with no gradient path to the variables."""

import torch

from problems.toy import quadratic_upper

_calls = {"n": 0}


def upper(upper_view, lower_view, batch, mode="raise", after=7, rho=0.1):
    _calls["n"] += 1
    if _calls["n"] > after:
        if mode == "raise":
            raise RuntimeError(f"the upper objective failed on call {_calls['n']}")
        return torch.tensor(1.0, dtype=torch.float64)
    return quadratic_upper(upper_view, lower_view, batch, rho=rho)


def gated_upper(upper_view, lower_view, batch, gate="", after=2, rho=0.1):
    """Waits from its call ``after`` on while the file ``gate`` exists (a run a test holds open)."""
    import os
    import time

    _calls["n"] += 1
    while _calls["n"] > after and gate and os.path.exists(gate):
        time.sleep(0.01)
    return quadratic_upper(upper_view, lower_view, batch, rho=rho)
