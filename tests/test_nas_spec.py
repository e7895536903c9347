"""Search spaces in the spec: cells as networkx DAGs, their validation, and clear errors for bad
cells, unknown operations and broken references between the architecture and the supernet."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bilevel.cli import app
from bilevel.nas.search_space import cell_edges, cell_graph, dense_edges, incoming
from bilevel.presets import find_preset
from bilevel.spec import SpecError, spec_from_data

runner = CliRunner()
DIGITS = yaml.safe_load(find_preset("nas/digits").read_text())


def test_the_dense_cell_is_the_darts_cell() -> None:
    graph = cell_graph(2, 4)
    edges = cell_edges(graph)
    assert len(edges) == 14 == len(dense_edges(2, 4))
    assert edges[:5] == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]  # sorted by destination, then source
    assert {node: len(rows) for node, rows in incoming(graph).items()} == {2: 2, 3: 3, 4: 4, 5: 5}


@pytest.mark.parametrize(
    ("edges", "message"),
    [
        ([[0, 2], [2, 3], [3, 2]], "cycle (2 -> 3 -> 2)"),
        ([[0, 2], [2, 2]], "cycle"),
        ([[0, 2], [1, 3]], None),  # valid: every node reachable
        ([[0, 2], [2, 9]], "names node 9; nodes are 0..3"),
        ([[0, 2], [2, 1], [1, 3]], "ends at input node 1"),
        ([[0, 2], [0, 2], [1, 3]], "declared twice"),
        ([[0, 2], [3, 3]], "cycle"),
        ([[0, 2]], "intermediate node 3 cannot be reached"),
    ],
)
def test_cell_graph_validation(edges: list[list[int]], message: str | None) -> None:
    if message is None:
        assert cell_graph(2, 2, edges).number_of_edges() == len(edges)
        return
    with pytest.raises(ValueError) as info:
        cell_graph(2, 2, edges)
    assert message in str(info.value)


def _write(tmp_path: Path, change) -> Path:
    data = copy.deepcopy(DIGITS)
    change(data)
    path = tmp_path / "nas.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _space(data: dict) -> dict:
    return data["levels"]["upper"]["variables"]["arch"]["space"]


BAD = {
    "cyclic cell": (
        lambda d: _space(d).update(cell={"inputs": 2, "nodes": 3, "edges": [[0, 2], [1, 3], [3, 4], [4, 3]]}),
        "levels.upper.variables.arch.space.cell.edges", "cycle (3 -> 4 -> 3)",
    ),
    "unknown op": (
        lambda d: _space(d)["ops"].append("sep_conv_9x9"),
        "levels.upper.variables.arch.space.ops.5", "Input should be 'none', 'skip_connect'",
    ),
    "disconnected node": (
        lambda d: _space(d).update(cell={"inputs": 2, "nodes": 3, "edges": [[0, 2], [1, 3], [2, 3]]}),
        "levels.upper.variables.arch.space.cell.edges", "intermediate node 4 cannot be reached",
    ),
    "edge to a missing node": (
        lambda d: _space(d).update(cell={"nodes": 2, "edges": [[0, 2], [1, 7]]}),
        "levels.upper.variables.arch.space.cell.edges", "names node 7",
    ),
    "only none": (lambda d: _space(d).update(ops=["none"]), "levels.upper.variables.arch.space.ops", "other than none"),
    "repeated op": (lambda d: _space(d)["ops"].append("none"), "levels.upper.variables.arch.space.ops", "more than once: none"),
    "partial channels": (lambda d: _space(d).update(partial_channels=3), "levels.upper.variables.arch.space.partial_channels",
                         "channels (8) must be divisible by partial_channels (3)"),
    "reduction out of range": (lambda d: _space(d).update(reductions=[1, 3]), "levels.upper.variables.arch.space.reductions",
                               "out of range"),
    "unknown space kind": (lambda d: _space(d).update(kind="transformer"), "levels.upper.variables.arch.space", "unknown kind; expected one of 'conv', 'mlp'"),
    "supernet of a missing variable": (
        lambda d: d["levels"]["lower"]["variables"]["net"].update(architecture="alpha"),
        "levels.lower.variables.net.architecture", "no variable 'alpha'; architecture variables: arch",
    ),
    "supernet of a tensor": (
        lambda d: (d["levels"]["upper"]["variables"].update(t={"shape": [2]}),
                   d["levels"]["lower"]["variables"]["net"].update(architecture="t")),
        "levels.lower.variables.net.architecture", "'t' is a tensor variable",
    ),
    "architecture below the supernet": (
        lambda d: (d["levels"]["lower"]["variables"].update(arch2=copy.deepcopy(d["levels"]["upper"]["variables"]["arch"])),
                   d["levels"]["lower"]["variables"]["net"].update(architecture="arch2")),
        "levels.lower.variables.net.architecture", "not above level 'lower'",
    ),
    "skip limit that cannot be met": (
        lambda d: _space(d).update(ops=["none", "skip_connect"], max_skip=0),
        "levels.upper.variables.arch.space.max_skip",
        "max_skip 0 cannot be met: ops has no operation other than none and skip_connect, so all 6 edges",
    ),
    "keep above a node's incoming edges": (
        lambda d: _space(d).update(cell={"inputs": 2, "nodes": 2, "edges": [[0, 2], [1, 3], [2, 3]], "keep": 2}),
        "levels.upper.variables.arch.space.cell.keep", "intermediate node 2 has only 1 incoming edge (from 0)",
    ),
    "keep above the dense cell's": (
        lambda d: _space(d).update(cell={"inputs": 2, "nodes": 3, "keep": 3}),
        "levels.upper.variables.arch.space.cell.keep", "keep is 3, but intermediate node 2 has only 2 incoming edges",
    ),
    "default keep with one input": (  # the default keep (2) is checked too
        lambda d: _space(d).update(cell={"inputs": 1, "nodes": 3}),
        "levels.upper.variables.arch.space.cell.keep", "intermediate node 1 has only 1 incoming edge",
    ),
    "early stop without estimates": (
        lambda d: d.update(engine={"kind": "darts", "early_stop_ratio": 0.75}), "engine", "needs eigen_every",
    ),
    "retrain without data": (
        lambda d: d["levels"]["upper"]["variables"]["arch"]["retrain"].pop("data"),
        "levels.upper.variables.arch.retrain.data", "required",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_search_space_is_a_clear_error(case: str, tmp_path: Path) -> None:
    change, path, message = BAD[case]
    spec = _write(tmp_path, change)
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert any(str(spec) in line and path in line and message in line for line in lines), result.output


def test_the_preset_validates_and_the_schema_lists_operations() -> None:
    loaded = spec_from_data(DIGITS)
    arch = loaded.spec.levels["upper"].variables["arch"]
    assert arch.kind == "architecture" and arch.space.cell_types == ("normal", "reduce")
    assert arch.space.reduction_cells() == [1, 2]
    from bilevel.spec import spec_schema

    schema = str(spec_schema())
    assert "sep_conv_3x3" in schema and "linear_tanh" in schema


def test_operation_catalogues_match_the_spec() -> None:
    """Every operation name the spec accepts has an implementation, and no implementation is unreachable."""
    from typing import get_args

    from bilevel.nas.ops import CONV_OPS, MLP_OPS
    from bilevel.spec.search_space import ConvOp, MLPOp

    assert set(get_args(ConvOp)) == set(CONV_OPS)
    assert set(get_args(MLPOp)) == set(MLP_OPS)


def test_python_api_errors_name_the_path() -> None:
    data = copy.deepcopy(DIGITS)
    _space(data)["cell"] = {"nodes": 2, "edges": [[0, 2], [2, 3], [3, 2]]}
    with pytest.raises(SpecError) as info:
        spec_from_data(data)
    assert "levels.upper.variables.arch.space.cell.edges" in str(info.value)


@pytest.mark.parametrize(
    ("ops", "cell", "max_skip", "valid"),
    [
        (["none", "skip_connect"], {"nodes": 3}, 5, False),       # 6 kept edges, all skips
        (["none", "skip_connect"], {"nodes": 3}, 6, True),        # every kept edge may be a skip
        (["none", "skip_connect", "tanh"], {"nodes": 3}, 0, True),  # one other operation suffices
        (["none", "tanh"], {"nodes": 3}, 0, True),                # no skips at all
        (["none", "skip_connect"], {"nodes": 3, "keep": 1}, 2, False),
    ],
)
def test_the_skip_limit_is_checked_against_what_the_derivation_can_do(ops, cell, max_skip, valid) -> None:
    """The MLP space too; and a limit given in Python to derive_genotype or random_genotype is
    refused the same way, not after drawing cells until a retry limit."""
    from bilevel.nas.genotype import derive_genotype, random_genotype
    from bilevel.nas.supernet import Architecture
    from bilevel.spec import ArchitectureVariable, CellSpec, MLPSearchSpace

    def space(limit):
        return MLPSearchSpace(ops=ops, cell=CellSpec(**cell), width=4, in_features=4, classes=2, max_skip=limit)

    if valid:
        assert space(max_skip).max_skip == max_skip
    else:
        with pytest.raises(ValueError, match=f"max_skip {max_skip} cannot be met"):
            space(max_skip)
    unlimited = space(None)
    weights = Architecture(ArchitectureVariable(space=unlimited))()
    generator = torch.Generator().manual_seed(0)
    if valid:
        assert derive_genotype(weights, unlimited, max_skip=max_skip).skip_count() <= max_skip
        assert random_genotype(unlimited, generator, max_skip=max_skip).skip_count() <= max_skip
    else:
        for derive in (lambda: derive_genotype(weights, unlimited, max_skip=max_skip),
                       lambda: random_genotype(unlimited, generator, max_skip=max_skip)):
            with pytest.raises(ValueError, match=f"max_skip {max_skip} cannot be met"):
                derive()
