"""Weight-entangled supernets (Sukthanker et al. 2024): the superposed operations are their
candidates at a one-hot architecture and mix as documented otherwise; they hold fewer parameters
and need less memory per training step than one weight per candidate; the macro space of kernel
sizes and widths runs end to end (search, genotype, retraining); bad spaces are clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as nnf
import yaml
from torch import nn
from typer.testing import CliRunner

from bilevel import compile_spec
from bilevel.cli import app
from bilevel.nas.entangled import EntangledConvLayer, _run_masked, centre_masks, entangled_groups
from bilevel.nas.footprint import parameter_count, supernet_footprint
from bilevel.nas.genotype import architecture_from_json, derive_architecture, random_architecture
from bilevel.nas.macro import MacroGenotype, MacroNetwork, MacroSupernet, check_macro_genotype
from bilevel.nas.memory import supernet_activation_mb
from bilevel.nas.ops import conv_op
from bilevel.nas.supernet import MixedOp, Supernet
from bilevel.presets import find_preset
from bilevel.spec import load_spec

runner = CliRunner()
ARCH = "levels.upper.variables.arch"
MACRO = yaml.safe_load(find_preset("nas/digits_macro").read_text())
CELLS = yaml.safe_load(find_preset("nas/digits_entangled").read_text())
QUICK = ["run.steps=3", "run.monitor_every=3", f"{ARCH}.warmup_steps=1", f"{ARCH}.retrain.epochs=1",
         f"{ARCH}.retrain.repeats=1", "run.checkpoint_every=null"]


def _copy_centre(small: nn.Module, large: nn.Module) -> None:
    """Give ``small`` (a candidate) the weights of ``large`` (its family's operation): its k x k
    kernels are the centre of the K x K ones, everything else as it is."""
    with torch.no_grad():
        for a, b in zip(small.modules(), large.modules()):
            if isinstance(a, nn.Conv2d):
                k, big = a.kernel_size[0], b.kernel_size[0]
                start = (big - k) // 2
                a.weight.copy_(b.weight[:, :, start : start + k, start : start + k])


@pytest.mark.parametrize("family", [["sep_conv_3x3", "sep_conv_5x5"], ["dil_conv_3x3", "dil_conv_5x5"], ["conv_1x1", "conv_3x3"],
                                    ["sharp_sep_conv_3x3", "sharp_sep_conv_5x5"], ["sharp_dil_conv_3x3", "sharp_dil_conv_5x5"]])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_one_hot_family_is_its_candidate_with_the_centre_weights(family: list[str], stride: int) -> None:
    torch.manual_seed(0)
    ops = ["none", "skip_connect", *family]
    mixed = MixedOp("conv", ops, 6, stride, mixed_op="entangled").double()
    assert len(mixed.families) == 1 and len(mixed.ops) == 2  # none, skip_connect; the family is one operation
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    for index, name in enumerate(family):
        candidate = conv_op(name, 6, stride, affine=False, search=True).double()
        _copy_centre(candidate, mixed.families[0].op)
        weights = torch.zeros(len(ops), dtype=torch.float64)
        weights[2 + index] = 1.0
        assert torch.equal(mixed(x, weights), candidate(x)), name


def test_the_superposed_kernel_is_the_mixture_of_the_candidates_convolutions() -> None:
    """conv(x, W (.) sum_k u_k m_k) = sum_k u_k conv(x, W (.) m_k): the kernel superposition is
    exact for the convolution that carries it (linearity)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    masks = centre_masks([3, 5], 5, x)
    u = torch.tensor([0.3, 0.7], dtype=torch.float64)
    mixed = _run_masked(conv, x, (u.reshape(-1, 1, 1) * masks).sum(0), 5)
    separate = sum(u[i] * nnf.conv2d(x, conv.weight * masks[i], None, 1, 2, 1, 4) for i in range(2))
    assert torch.allclose(mixed, separate, atol=1e-12)
    with pytest.raises(ValueError, match="no centre"):
        centre_masks([4], 5, x)


def test_the_entangled_mixture_weighs_each_family_by_its_total_weight() -> None:
    torch.manual_seed(2)
    ops = ["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
    mixed = MixedOp("conv", ops, 4, 1, mixed_op="entangled").double()
    assert entangled_groups(ops) == {"sep_conv": ["sep_conv_3x3", "sep_conv_5x5"], "dil_conv": ["dil_conv_3x3", "dil_conv_5x5"]}
    w = torch.softmax(torch.randn(len(ops), dtype=torch.float64), 0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = w[1] * mixed.ops[1](x) + w[2] * mixed.ops[2](x)
    for family, rows in zip(mixed.families, ([3, 4], [5, 6])):
        expected = expected + w[rows].sum() * family(x, w[rows] / w[rows].sum())
    assert torch.allclose(mixed(x, w), expected, atol=1e-12)


def test_a_macro_layer_is_its_candidates_sliced_from_one_weight() -> None:
    """One-hot (k, c): a c-channel k x k convolution with the centre of the first c filters,
    zero-padded to the widest; any width mixture is exactly the mixture of those candidates."""
    torch.manual_seed(3)
    layer = EntangledConvLayer(3, [3, 5, 7], [2, 4, 6]).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    for ki, k in enumerate([3, 5, 7]):
        for ci, c in enumerate([2, 4, 6]):
            p, q = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            p[ki], q[ci] = 1.0, 1.0
            start = (7 - k) // 2
            weight = layer.conv.weight[:c, :, start : start + k, start : start + k]
            reference = nnf.relu(nnf.batch_norm(nnf.conv2d(x, weight, None, 1, k // 2), None, None, training=True))
            assert torch.allclose(layer(x, p, q), nnf.pad(reference, (0, 0, 0, 0, 0, 6 - c)), atol=1e-10), (k, c)
    p, q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    by_width = sum(q[i] * layer(x, p, torch.eye(3, dtype=torch.float64)[i]) for i in range(3))
    assert torch.allclose(layer(x, p, q), by_width, atol=1e-12)


def _macro(mixed: str, **space) -> tuple[MacroSupernet, object]:
    loaded = load_spec(find_preset("nas/digits_macro"), overrides=[f"{ARCH}.space.mixed_op={mixed}",
                                                                    *(f"{ARCH}.space.{k}={v}" for k, v in space.items())])
    arch = loaded.spec.levels["upper"].variables["arch"]
    torch.manual_seed(0)
    return MacroSupernet(arch), arch


def test_the_entangled_macro_supernet_has_one_weight_per_layer() -> None:
    entangled, arch = _macro("entangled")
    separate, _ = _macro("separate")
    space = arch.space
    inputs = [space.in_channels] + [max(space.widths)] * (space.layers - 1)
    classifier = max(space.widths) * space.classes + space.classes
    assert parameter_count(entangled) == sum(max(space.widths) * c * max(space.kernels) ** 2 for c in inputs) + classifier
    per_candidate = sum(w * k * k for w in space.widths for k in space.kernels)
    assert parameter_count(separate) == sum(per_candidate * c for c in inputs) + classifier
    assert parameter_count(entangled) < parameter_count(separate) / 2.5  # 152,426 against 451,186


@pytest.mark.parametrize("preset", ["nas/digits_macro", "nas/digits_entangled"])
def test_the_entangled_supernet_is_smaller_and_needs_less_memory_per_step(preset: str) -> None:
    """Parameters and the measured peak memory of one training step (batch 64, CPU profiler's
    allocation events) of the entangled supernet against the one-weight-per-candidate one."""
    figures, estimates = {}, {}
    for mixed in ("entangled", "separate"):
        torch.manual_seed(0)
        problem = compile_spec(load_spec(find_preset(preset), overrides=[f"{ARCH}.space.mixed_op={mixed}"]), "cpu")
        batch = problem.lower.data.full
        net, weights = problem.lower.modules["net"].module, problem.upper.modules["arch"].module()
        figures[mixed] = supernet_footprint(net, weights, batch["x"][:64], batch["y"][:64])
        estimates[mixed] = supernet_activation_mb(problem)
    assert figures["entangled"]["parameters"] < figures["separate"]["parameters"]
    assert 0 < figures["entangled"]["peak_step_bytes"] < 0.8 * figures["separate"]["peak_step_bytes"]
    assert 0 < estimates["entangled"] < estimates["separate"]  # the planner sees the difference too


def test_macro_genotypes_derive_draw_and_round_trip() -> None:
    _, arch = _macro("entangled")
    from bilevel.nas.macro import MacroArchitecture

    module = MacroArchitecture(arch)
    with torch.no_grad():
        module.kernel.zero_()
        module.width.zero_()
        module.kernel[:, 1] = 1.0   # 5x5 everywhere
        module.width[0, 0] = 1.0    # 8 channels first, then the widest
        module.width[1:, 2] = 1.0
    genotype = derive_architecture(module(), arch.space)
    assert genotype == MacroGenotype(((5, 8), (5, 32), (5, 32), (5, 32)))
    assert architecture_from_json({"genotype": genotype.to_json()}, arch.space) == genotype
    assert check_macro_genotype(MacroGenotype(((4, 8),) * 4), arch.space) == ("layers.0", "kernel 4 is not one of the space's kernels [3, 5, 7]")
    assert check_macro_genotype(MacroGenotype(((3, 8),) * 3), arch.space)[0] == "layers"
    drawn = random_architecture(arch.space, torch.Generator().manual_seed(0))
    assert check_macro_genotype(drawn, arch.space) is None
    net = MacroNetwork(arch.space, genotype)
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert [layer[0].out_channels for layer in net.layers] == [8, 32, 32, 32]


def test_macro_preset_searches_retrains_and_refuses_resizing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "nas/digits_macro", "-q", "--out", str(out), *sum((["--set", o] for o in QUICK), [])])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "result.json").read_text())
    assert written["engine"] == "darts" and len(written["report"]["architecture"]) == 4
    for name in ("genotype.json", "cell.png", "alphas.png", "retrain.json"):
        assert (out / name).stat().st_size > 0, name
    again = runner.invoke(app, ["retrain", str(out), "--epochs", "1"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "retrain.json").read_text())["genotype"] == json.loads((out / "genotype.json").read_text())["genotype"]
    resized = runner.invoke(app, ["retrain", str(out), "--channels", "16"])
    assert resized.exit_code == 2 and "Traceback" not in resized.output and "retrain.channels" in resized.output
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"genotype": {"layers": [[9, 8], [3, 8], [3, 8], [3, 8]]}}))
    bad = runner.invoke(app, ["retrain", str(out), "--genotype", str(wrong)])
    assert bad.exit_code == 2 and "genotype.layers.0" in bad.output and "kernel 9" in bad.output


def test_the_entangled_cell_preset_runs_and_derives_cells_of_its_operations(tmp_path: Path) -> None:
    out = tmp_path / "cells"
    quick = ["run.steps=2", "run.monitor_every=2", f"{ARCH}.warmup_steps=1", f"{ARCH}.retrain=null", "run.checkpoint_every=null"]
    result = runner.invoke(app, ["run", "nas/digits_entangled", "-q", "--out", str(out), *sum((["--set", o] for o in quick), [])])
    assert result.exit_code == 0, result.output
    genotype = json.loads((out / "genotype.json").read_text())["genotype"]
    ops = set(CELLS["levels"]["upper"]["variables"]["arch"]["space"]["ops"]) - {"none"}
    assert {op for cell in genotype.values() for op, _, _ in cell} <= ops
    net = Supernet(load_spec(find_preset("nas/digits_entangled")).spec.levels["upper"].variables["arch"])
    assert all(len(m.families) == 2 for m in net.modules() if isinstance(m, MixedOp))


def _space(data: dict) -> dict:
    return data["levels"]["upper"]["variables"]["arch"]["space"]


BAD = {
    "even kernel": (MACRO, lambda d: _space(d).update(kernels=[3, 4, 7]), f"{ARCH}.space.kernels", "kernel sizes [4] are even"),
    "repeated kernel": (MACRO, lambda d: _space(d).update(kernels=[3, 3]), f"{ARCH}.space.kernels", "more than once: [3]"),
    "zero kernel": (MACRO, lambda d: _space(d).update(kernels=[0, 3]), f"{ARCH}.space.kernels.0", "greater than or equal to 1"),
    "repeated width": (MACRO, lambda d: _space(d).update(widths=[8, 8]), f"{ARCH}.space.widths", "more than once: [8]"),
    "nothing to search": (MACRO, lambda d: _space(d).update(kernels=[3], widths=[8]), f"{ARCH}.space.widths", "nothing to search"),
    "pool out of range": (MACRO, lambda d: _space(d).update(pool_after=[1, 4]), f"{ARCH}.space.pool_after", "out of range; layers are 0..3"),
    "macro retrain resized": (MACRO, lambda d: d["levels"]["upper"]["variables"]["arch"]["retrain"].update(channels=16),
                              f"{ARCH}.retrain", "retrain.channels resizes a cell network"),
    "unknown mixed op": (MACRO, lambda d: _space(d).update(mixed_op="shared"), f"{ARCH}.space.mixed_op", "'entangled'"),
    "entangled cells without a family": (CELLS, lambda d: _space(d).update(ops=["none", "skip_connect", "sep_conv_3x3", "dil_conv_5x5"]),
                                         f"{ARCH}.space.mixed_op", "ops has no two candidates of one family"),
    "entangled mlp cells": (CELLS, lambda d: d["levels"]["upper"]["variables"]["arch"].update(
        space={"kind": "mlp", "ops": ["none", "linear"], "in_features": 64, "classes": 10, "mixed_op": "entangled"}),
        f"{ARCH}.space.mixed_op", "MLP cells have no kernel sizes to entangle"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_entangled_spaces_are_clear_errors(case: str, tmp_path: Path) -> None:
    base, change, path, message = BAD[case]
    data = copy.deepcopy(base)
    change(data)
    spec = tmp_path / "space.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any(str(spec) in line and path in line and message in line for line in lines), result.output


def test_macro_alphas_are_rows_of_kernels_and_widths() -> None:
    _, arch = _macro("entangled", layers=2, pool_after="[0]")
    from bilevel.nas.macro import MacroArchitecture

    values = MacroArchitecture(arch)()
    assert values["kernel"].shape == (2, 3) and values["width"].shape == (2, 3)
    assert torch.allclose(values["kernel"].sum(-1), torch.ones(2)) and values.space.kind == "macro"
