"""A constraint on the ridge weights for LV-HBA's distributed case: sum(w) <= 1."""


def constraint(upper, lower, batch):
    return (lower["w"].sum() - 1.0).reshape(1)
