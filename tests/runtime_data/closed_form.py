"""User code for tests/test_closed_form.py: a closed-form ridge solution (right and wrong), an
init function whose arguments pydantic validates, and an objective that names a bad variable."""

from typing import Annotated

import torch
from pydantic import Field, validate_call

from bilevel.spec import VariableError
from problems.toy import ridge_lower, ridge_solution


def solution(upper, lower, batch):
    return {"w": ridge_solution(upper["lam"], batch)}


def wrong_name(upper, lower, batch):
    return {"v": ridge_solution(upper["lam"], batch)}


def wrong_shape(upper, lower, batch):
    return {"w": ridge_solution(upper["lam"], batch)[:3]}


@validate_call
def filled(value: Annotated[float, Field(le=0.0)], size: Annotated[int, Field(ge=1)] = 10):
    return torch.full((size,), value)


def picky_lower(upper, lower, batch):
    if upper["lam"].shape != (10,):
        raise VariableError("lam", f"has shape {list(upper['lam'].shape)}, expected [10] (one strength per feature)")
    return ridge_lower(upper, lower, batch)
