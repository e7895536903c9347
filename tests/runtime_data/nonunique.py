"""A lower level with a line of minimizers: G(x, y) = 1/2 (y1 + y2 - x)^2.
With F = 1/2 (y1 - 1)^2 + 1/2 (y2 - 1)^2 + 1/2 (x - 3)^2 the optimistic bilevel solution takes
y1 = y2 = x / 2 on the solution line, so F = (x/2 - 1)^2 + 1/2 (x - 3)^2 and x* = 8/3."""


def lower(upper, lower, batch):
    return 0.5 * (lower["y"].sum() - upper["x"]) ** 2


def upper(upper, lower, batch):
    return 0.5 * ((lower["y"] - 1) ** 2).sum() + 0.5 * (upper["x"] - 3) ** 2
