"""sharpDARTS (Hundt et al. 2019): cosine power annealing as a schedule of the outer optimizer, of
the DARTS engines' weight solver and of retraining; the SharpSepConv operation; MaxW weighting of
the mixture; the preset; and clear errors for bad schedule and weighting settings."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import bilevel
from bilevel import build_engine, compile_spec
from bilevel.cli import app
from bilevel.engines import DartsConfig, RartsConfig
from bilevel.nas.genotype import derive_genotype
from bilevel.nas.ops import SharpSepConv, conv_op
from bilevel.nas.supernet import Architecture, MixedOp, max_w
from bilevel.presets import find_preset
from bilevel.runtime.outer import scheduled_lr
from bilevel.schedules import schedule_factor, scheduled_value
from bilevel.spec import ArchitectureVariable, BilevelSpec, CellSpec, ConvSearchSpace, load_spec
from bilevel.spec.level import OptimizerSpec
from problems.nas.toy import toy_spec

runner = CliRunner()
SHARP = yaml.safe_load(find_preset("nas/digits_sharpdarts").read_text())


# --- cosine power annealing -----------------------------------------------------------------------
def _paper_curve(k: float, points: int) -> list[float]:
    """The paper's curve k^(c + 1), c = (1 + cos(pi t)) / 2 on a grid of t in [0, 1], rescaled to
    [0, 1] by its minimum and maximum (as the official code rescales its curve)."""
    raw = [k ** (0.5 * (1 + math.cos(math.pi * i / (points - 1))) + 1) for i in range(points)]
    low, high = min(raw), max(raw)
    return [(r - low) / (high - low) for r in raw]


@pytest.mark.parametrize("k", [1.5, 2.0, 10.0])
def test_cosine_power_factor_is_the_papers_rescaled_curve(k: float) -> None:
    points = 11
    ours = [schedule_factor("cosine_power", i / (points - 1), k) for i in range(points)]
    assert ours == pytest.approx(_paper_curve(k, points), abs=1e-12)
    assert ours[0] == 1.0 and ours[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a > b for a, b in zip(ours, ours[1:]))  # strictly decreasing
    cosine = [schedule_factor("cosine", i / (points - 1)) for i in range(points)]
    assert all(p < c for p, c in zip(ours[1:-1], cosine[1:-1]))  # below cosine in between: it decays faster early


def test_cosine_power_with_base_one_is_cosine_and_the_warmup_ramps_linearly() -> None:
    for t in range(10):
        assert scheduled_value(0.1, t, 10, "cosine_power", 0.1, 1.0) == pytest.approx(scheduled_value(0.1, t, 10, "cosine", 0.1))
    rates = [scheduled_value(0.025, t, 20, "cosine_power", 0.004, 2.0, warmup=4) for t in range(20)]
    assert rates[:5] == pytest.approx([0.025 * (t + 1) / 5 for t in range(4)] + [0.025])  # warm-up, then the peak at step 4
    assert rates[-1] == pytest.approx(0.025 * 0.004)  # the minimum at the last step
    c = 0.5 * (1 + math.cos(math.pi * 0.5))  # halfway through the decay (step 4 + 7.5): (2^c - 1) / (2 - 1)
    assert scheduled_value(0.025, 11.5, 20, "cosine_power", 0.0, 2.0, warmup=4) == pytest.approx(0.025 * (2**c - 1))


def test_the_outer_schedules_keep_their_values() -> None:
    """The existing schedules are unchanged by the new one (the same arithmetic as always)."""
    spec = OptimizerSpec(lr=0.1, schedule="cosine", final_lr_ratio=0.1)
    low = 0.1 * 0.1
    expected = [low + 0.5 * (0.1 - low) * (1 + math.cos(math.pi * min(t / 4, 1.0))) for t in range(5)]
    assert [scheduled_lr(spec, t, 5) for t in range(5)] == expected  # bitwise
    linear = OptimizerSpec(lr=0.1, schedule="linear")
    assert [scheduled_lr(linear, t, 3) for t in range(3)] == [0.1, 0.1 + (0.0 - 0.1) * 0.5, 0.0]
    power = OptimizerSpec(lr=0.2, schedule="cosine_power", power_base=10.0, schedule_steps=5)
    assert scheduled_lr(power, 4, 1000) == pytest.approx(0.0) and scheduled_lr(power, 0, 1000) == 0.2  # schedule_steps wins


def _toy_with_weight_schedule(**solver) -> BilevelSpec:
    data = toy_spec(steps=6, inner_lr=0.3, outer_lr=0.1, alpha0=0.5).model_dump(mode="json")
    data["levels"]["lower"]["solver"].update(solver)
    return BilevelSpec.model_validate(data)


def _drive(config, spec: BilevelSpec, steps: int):
    problem = compile_spec(spec)
    x = problem.fresh(problem.upper.init)
    engine = build_engine(config)
    state = engine.init(problem, x)
    trace = []
    for _ in range(steps):
        out = engine.hypergrad(problem, x, state, problem.upper.batch())
        x, state = tuple(p - 0.1 * g for p, g in zip(x, out.grad)), out.state
        trace.append((float(x[0]), float(state.lower[0]), out.stats.extra.get("weight_lr")))
    return trace


@pytest.mark.parametrize("order", [1, 2])
def test_darts_steps_the_weights_at_the_scheduled_rate(order: int) -> None:
    """On the analytic toy (L_train = (w - alpha)^2, L_val = alpha w - 2 alpha + 1), DARTS with a
    cosine-power weight schedule and 2 warm-up weight steps is the recursion written out here:
    weight step t at lr_t; order 2's virtual step xi = the rate of the last weight step taken."""
    solver = {"schedule": "cosine_power", "power_base": 2.0, "final_lr_ratio": 0.1, "schedule_warmup": 1, "schedule_steps": 7}
    spec = _toy_with_weight_schedule(**solver)
    config = DartsConfig(order=order, warmup_steps=2)
    rate = [scheduled_value(0.3, t, 7, "cosine_power", 0.1, 2.0, warmup=1) for t in range(7)]
    alpha, w, t, expected = 0.5, 0.0, 0, []
    for call in range(5):
        for _ in range(3 if call == 0 else 1):  # the first call takes the 2 warm-up steps too
            w -= rate[t] * 2 * (w - alpha)
            t += 1
        xi = rate[t - 1]
        moved = w - xi * 2 * (w - alpha)
        grad = (w - 2) if order == 1 else (moved - 2 + 2 * xi * alpha)  # d/dalpha L_val(alpha, w'(alpha))
        alpha -= 0.1 * grad
        expected.append((alpha, w, xi))
    got = _drive(config, spec, 5)
    assert [v for row in got for v in row] == pytest.approx([v for row in expected for v in row], abs=1e-12)


def test_rarts_steps_both_copies_at_the_scheduled_rate() -> None:
    spec = _toy_with_weight_schedule(schedule="cosine_power", schedule_steps=4)
    rate = [scheduled_value(0.3, t, 4, "cosine_power", 0.0, 2.0) for t in range(4)]
    lam, beta = 1.0, 10.0
    alpha, w, y, expected = 0.5, 0.0, 0.0, []
    for t in range(4):
        w -= rate[t] * (2 * lam * (w - alpha) + beta * (w - y))
        y -= rate[t] * (alpha + beta * (y - w))
        alpha -= 0.1 * ((y - 2) - 2 * lam * (w - alpha))
        expected.append((alpha, w))
    got = [v for a, ww, _ in _drive(RartsConfig(lam=lam, beta=beta), spec, 4) for v in (a, ww)]
    assert got == pytest.approx([v for row in expected for v in row], abs=1e-12)


def test_retraining_follows_its_schedule(monkeypatch) -> None:
    """The retraining loop sets the rate of every step from RetrainSpec's schedule; the default
    (cosine to 0 over steps + 1) is the rate retraining has always used."""
    from bilevel.nas import retrain as retrain_module
    from bilevel.nas.genotype import random_genotype

    seen: list[float] = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    arch = load_spec(find_preset("nas/digits_sharpdarts")).spec.levels["upper"].variables["arch"]
    genotype = random_genotype(arch.space, torch.Generator().manual_seed(0))
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    splits = {"train": (x, y), "test": (x[:10], y[:10])}
    for settings, expect in (
        (arch.retrain.model_copy(update={"epochs": 2, "batch_size": 10, "warmup_epochs": 1}),
         [scheduled_value(0.05, t, 9, "cosine_power", 4e-7, 2.0, warmup=4) for t in range(8)]),
        (arch.retrain.model_copy(update={"epochs": 2, "batch_size": 10, "schedule": "cosine", "final_lr_ratio": 0.0, "warmup_epochs": 0}),
         [0.5 * 0.05 * (1 + math.cos(math.pi * t / 8)) for t in range(8)]),
    ):
        seen.clear()
        retrain_module._train_once(genotype, arch, settings, 0, splits, torch.device("cpu"), torch.float32)
        assert seen == pytest.approx(expect, rel=1e-12)


# --- SharpSepConv and MaxW ------------------------------------------------------------------------
def test_sharp_sep_conv_is_one_separable_block_with_a_relu_inside() -> None:
    op = conv_op("sharp_sep_conv_5x5", 6, 1, affine=True, search=False)
    assert isinstance(op, SharpSepConv)
    kinds = [type(m).__name__ for m in op]
    assert kinds == ["ReLU", "Conv2d", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "Conv2d", "BatchNorm2d"]
    depthwise, pointwise = op[1], op[2]
    assert depthwise.kernel_size == (5, 5) and depthwise.groups == 6 and pointwise.kernel_size == (1, 1)
    # two depthwise 5x5 and two pointwise 6x6, plus two affine BatchNorms
    assert sum(p.numel() for p in op.parameters()) == 2 * 6 * 25 + 2 * 36 + 2 * 12
    x = torch.randn(2, 6, 8, 8)
    assert op(x).shape == (2, 6, 8, 8)
    assert conv_op("sharp_dil_conv_3x3", 6, 2, affine=False, search=True)(x).shape == (2, 6, 4, 4)
    assert conv_op("sharp_dil_conv_3x3", 6, 1, affine=False, search=True)[1].dilation == (2, 2)
    assert conv_op("sharp_sep_conv_3x3", 6, 2, affine=False, search=True)(x).shape == (2, 6, 4, 4)


def test_max_w_weighs_the_strongest_candidate_one() -> None:
    torch.manual_seed(0)
    ops = ["none", "skip_connect", "avg_pool_3x3", "sharp_sep_conv_3x3"]
    weighted = MixedOp("conv", ops, 4, 1, weighting="max_w").double()
    weights = torch.softmax(torch.randn(4, dtype=torch.float64), 0)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    expected = sum((1 - weights.max() + weights[i]) * weighted.ops[i](x) for i in (1, 2, 3))
    assert torch.allclose(weighted(x, weights), expected, atol=1e-12)
    assert max_w(weights).max() == 1.0 and torch.allclose(max_w(weights) - weights, 1 - weights.max())


def test_max_w_leaves_the_derivation_to_the_softmax_weights() -> None:
    space = ConvSearchSpace(ops=["none", "skip_connect", "sep_conv_3x3"], cell=CellSpec(nodes=2), cells=1, channels=4,
                            in_channels=1, op_weighting="max_w")
    arch = Architecture(ArchitectureVariable(space=space, init_scale=1.0))
    weights = arch()
    plain = derive_genotype(weights, space.model_copy(update={"op_weighting": "softmax"}))
    assert derive_genotype(weights, space) == plain


# --- the preset and bad input ---------------------------------------------------------------------
def test_sharpdarts_preset_searches_with_max_w_and_logs_the_weight_schedule(tmp_path: Path) -> None:
    out = tmp_path / "run"
    quick = ["run.steps=4", "run.monitor_every=2", "levels.upper.variables.arch.warmup_steps=2",
             "levels.upper.variables.arch.retrain=null", "run.checkpoint_every=null",  # retraining: test_retraining_follows_its_schedule
             "levels.upper.variables.arch.space.op_weighting=max_w", "engine={kind: darts, order: 1}"]  # order 1: quick
    result = runner.invoke(app, ["run", "nas/digits_sharpdarts", "-q", "--out", str(out), *sum((["--set", o] for o in quick), [])])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    solver = SHARP["levels"]["lower"]["solver"]
    expected = [scheduled_value(solver["lr"], 2 + step, solver["schedule_steps"], "cosine_power", solver["final_lr_ratio"],
                                solver["power_base"], solver["schedule_warmup"]) for step in range(4)]
    assert [r["weight_lr"] for r in records] == pytest.approx(expected)
    genotype = json.loads((out / "genotype.json").read_text())
    assert genotype["architecture"]["space"]["op_weighting"] == "max_w"
    assert {op for op, _, _ in genotype["genotype"]["normal"]} <= {"skip_connect", "avg_pool_3x3", "sharp_sep_conv_3x3", "sharp_dil_conv_3x3"}
    assert json.loads((out / "result.json").read_text())["report"]["skip_connections_normal"] <= 2


def _space(data: dict) -> dict:
    return data["levels"]["upper"]["variables"]["arch"]["space"]


BAD = {
    "lower schedule without its length": (
        lambda d: d["levels"]["lower"]["solver"].pop("schedule_steps"), "levels.lower.solver", "needs schedule_steps",
    ),
    "warm-up as long as the schedule": (
        lambda d: d["levels"]["lower"]["solver"].update(schedule_warmup=130), "levels.lower.solver",
        "schedule_warmup (130) must be smaller than schedule_steps (130)",
    ),
    "power base below one": (
        lambda d: d["levels"]["lower"]["solver"].update(power_base=0.5), "levels.lower.solver.power_base",
        "greater than or equal to 1",
    ),
    "unknown schedule": (
        lambda d: d["levels"]["lower"]["solver"].update(schedule="exponential"), "levels.lower.solver.schedule",
        "'cosine_power'",
    ),
    "retrain power base below one": (
        lambda d: d["levels"]["upper"]["variables"]["arch"]["retrain"].update(power_base=0.0),
        "levels.upper.variables.arch.retrain.power_base", "greater than or equal to 1",
    ),
    "unknown weighting": (
        lambda d: _space(d).update(op_weighting="maxw"), "levels.upper.variables.arch.space.op_weighting", "'max_w'",
    ),
    "negative warm-up": (
        lambda d: d["levels"]["lower"]["solver"].update(schedule_warmup=-1), "levels.lower.solver.schedule_warmup",
        "greater than or equal to 0",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sharpdarts_settings_are_clear_errors(case: str, tmp_path: Path) -> None:
    change, path, message = BAD[case]
    data = copy.deepcopy(SHARP)
    change(data)
    spec = tmp_path / "sharp.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any(str(spec) in line and path in line and message in line for line in lines), result.output


def test_the_outer_optimizer_may_schedule_without_a_length(tmp_path: Path) -> None:
    """Only a lower solver needs schedule_steps; the outer optimizer's schedule spans run.steps."""
    data = toy_spec(steps=5).model_dump(mode="json")
    data["levels"]["upper"]["solver"].update(schedule="cosine_power")
    result = bilevel.run(BilevelSpec.model_validate(data), out=tmp_path, progress=False)
    assert result.result["steps"] == 5
