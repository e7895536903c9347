"""The NAS presets end to end (short runs): plan, run with the monitor and report hooks, the
files they write, `bilevel retrain`, the tabular and CIFAR-10 presets, and the supernet's pieces."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import bilevel
from bilevel.cli import app
from bilevel.nas.genotype import Genotype, random_genotype
from bilevel.nas.supernet import MixedOp, channel_shuffle
from bilevel.presets import find_preset
from bilevel.engines import RartsConfig
from bilevel.spec import load_spec

runner = CliRunner()
SPACE = "levels.upper.variables.arch.space"
QUICK = ["run.steps=4", "run.monitor_every=2", "levels.upper.variables.arch.warmup_steps=2",
         "levels.upper.variables.arch.retrain.epochs=1", "run.checkpoint_every=null"]


def test_plan_explains_the_darts_choice() -> None:
    result = runner.invoke(app, ["plan", "nas/digits"])
    assert result.exit_code == 0, result.output
    assert "engine: darts" in result.output and '"order": 2' in result.output and '"hessian": "exact"' in result.output
    assert "architecture mixture" in result.output and "exact mixed product fits" in result.output

    def plan_with(budget: float) -> dict:
        return json.loads(runner.invoke(app, ["plan", "nas/digits", "--json", "--set", f"run.budget.memory_mb={budget}"]).output)

    activations = plan_with(1e6)["facts"]["activation_mb"]
    assert activations > 1
    middle = plan_with(1.5 * activations)  # second order fits, its exact product (twice the activations) does not
    assert middle["config"]["order"] == 2 and middle["config"]["hessian"] == "finite_difference"
    small = plan_with(1)
    assert small["config"]["order"] == 1 and any("partial_channels" in w for w in small["warnings"])
    tabular = json.loads(runner.invoke(app, ["plan", "nas/tabular", "--json"]).output)
    assert tabular["engine"] == "rarts" and "adam" in tabular["reasons"][1]
    explicit = json.loads(runner.invoke(app, ["plan", "nas/digits", "--json", "--engine", "unrolled"]).output)
    assert any("architecture mixtures" in w for w in explicit["warnings"])


def test_digits_search_writes_genotypes_alphas_drawing_and_retrain(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "nas/digits", "-q", "--out", str(out), *sum((["--set", o] for o in QUICK), [])])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "result.json").read_text())
    assert written["engine"] == "darts" and written["status"] == "completed"
    report = written["report"]
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["retrain_params"] > 0
    assert report["skip_connections_normal"] <= 2  # the preset's max_skip
    assert sorted(p.name for p in (out / "genotypes").iterdir()) == ["step-000002.json", "step-000004.json"]
    for name in ("genotype.json", "cell.png", "alphas.png", "retrain.json"):
        assert (out / name).stat().st_size > 0, name
    genotype = Genotype.load(out / "genotype.json")
    assert set(genotype.cells) == {"normal", "reduce"} and len(genotype.cells["normal"]) == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitored = [r["monitor"] for r in records if "monitor" in r]
    assert len(monitored) == 2
    alphas = torch.tensor(monitored[-1]["alpha_normal"])
    assert alphas.shape == (9, 5) and torch.allclose(alphas.sum(1), torch.ones(9), atol=1e-5)
    assert (torch.tensor(written["upper_variables"]["arch"]["normal"]).softmax(1) - alphas).abs().max() < 1e-5

    # retrain the genotype of step 2 with another budget, from the command line: each retraining
    # writes a new file, and the search's own retrain.json stays as the search wrote it
    searched = (out / "retrain.json").read_bytes()
    again = runner.invoke(app, ["retrain", str(out), "--step", "2", "--epochs", "1", "--repeats", "2", "--json"])
    assert again.exit_code == 0, again.output
    payload = json.loads(again.output)
    assert payload["epochs"] == 1 and len(payload["test_accuracies"]) == 2 and payload["step"] == 2
    assert payload["genotype"] == json.loads((out / "genotypes" / "step-000002.json").read_text())["genotype"]
    assert payload["file"] == str(out / "retrains" / "retrain-001.json")
    assert json.loads((out / "retrains" / "retrain-001.json").read_text())["test_accuracies"] == payload["test_accuracies"]
    text = runner.invoke(app, ["retrain", str(out), "--epochs", "1"])
    assert text.exit_code == 0 and "test accuracy:" in text.output and "normal:" in text.output
    assert f"written: {out / 'retrains' / 'retrain-002.json'}" in text.output
    assert (out / "retrain.json").read_bytes() == searched
    bad = runner.invoke(app, ["retrain", str(out), "--epochs", "0"])
    assert bad.exit_code == 2 and "retrain.epochs" in bad.output and "Traceback" not in bad.output
    missing = runner.invoke(app, ["retrain", str(out), "--step", "3"])
    assert missing.exit_code == 2 and "step-000003.json" in missing.output


    # a hand-written cell: the genotype alone; the search space and retrain settings come from the run
    cell = {"normal": [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["conv_3x3", 0, 3], ["avg_pool_3x3", 2, 3],
                       ["dil_conv_3x3", 1, 4], ["sep_conv_3x3", 3, 4]],
            "reduce": [["max_pool_3x3", 0, 2], ["sep_conv_3x3", 1, 2], ["sep_conv_3x3", 0, 3], ["skip_connect", 2, 3],
                       ["avg_pool_3x3", 0, 4], ["dil_conv_3x3", 2, 4]]}
    mine = tmp_path / "my_cell.json"
    mine.write_text(json.dumps(cell))
    hand = runner.invoke(app, ["retrain", str(out), "--genotype", str(mine), "--epochs", "1", "--json"])
    assert hand.exit_code == 0, hand.output
    assert json.loads(hand.output)["genotype"] == cell  # conv_3x3 and max_pool_3x3: not searched, still buildable
    mine.write_text(json.dumps({"genotype": cell}))
    assert runner.invoke(app, ["retrain", str(out), "--genotype", str(mine), "--epochs", "1"]).exit_code == 0
    assert sorted(p.name for p in (out / "retrains").iterdir()) == [f"retrain-00{i}.json" for i in range(1, 5)]
    assert (out / "retrain.json").read_bytes() == searched  # --genotype does not replace it either
    for change, path, message in [
        (lambda c: c["normal"][1].__setitem__(0, "sep_conv_9x9"), "genotype.normal.1", "unknown operation 'sep_conv_9x9'"),
        (lambda c: c["normal"].__setitem__(5, ["sep_conv_3x3", 4, 3]), "genotype.normal.5", "[4, 3] is not an edge"),
        (lambda c: c["normal"].__setitem__(5, ["sep_conv_3x3", 1, 4]), "genotype.normal", "edge 5 = [1, 4] is declared twice"),
        (lambda c: c.pop("reduce"), "genotype", "no reduce cell"),
        (lambda c: c.__setitem__("normal", c["normal"][:4]), "genotype.normal", "intermediate node 4 cannot be reached"),
    ]:
        broken = json.loads(json.dumps(cell))
        change(broken)
        mine.write_text(json.dumps(broken))
        bad = runner.invoke(app, ["retrain", str(out), "--genotype", str(mine)])
        assert bad.exit_code == 2 and "Traceback" not in bad.output, bad.output
        assert f"{mine}: {path}: {message}" in bad.output, bad.output
    mine.write_text(json.dumps(cell))
    elsewhere = runner.invoke(app, ["retrain", str(tmp_path / "no-run"), "--genotype", str(mine)])
    assert elsewhere.exit_code == 2 and "takes its search space and retrain settings from a search run's genotype.json" in elsewhere.output


def test_rarts_runs_on_the_digits_preset(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("nas/digits"), overrides=[*QUICK, "levels.upper.variables.arch.retrain=null"])
    result = bilevel.run(loaded, engine=RartsConfig(), device="cpu", out=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.result["engine"] == "rarts" and all(r["hvp_count"] == 0 for r in records)
    assert records[-1]["weight_gap"] > 0 and "test_accuracy" not in result.result["report"]


def test_tabular_preset_runs_with_the_planned_engine(tmp_path: Path) -> None:
    loaded = load_spec(find_preset("nas/tabular"), overrides=QUICK)
    result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    assert result.result["engine"] == "rarts"
    assert Genotype.load(tmp_path / "genotype.json").cells.keys() == {"normal"}
    assert result.result["report"]["test_accuracy"] > 0.1


def test_cifar10_preset_smoke_with_synthetic_data_and_partial_channels(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("CIFAR10_ROOT", raising=False)
    overrides = [f"{SPACE}.cells=2", f"{SPACE}.channels=4", f"{SPACE}.partial_channels=2", f"{SPACE}.edge_normalization=true",
                 "levels.upper.data.kwargs.n=16", "levels.lower.data.kwargs.n=16", "levels.upper.data.batch_size=4",
                 "levels.lower.data.batch_size=4", "run.steps=2", "run.monitor_every=1", "run.checkpoint_every=null"]
    loaded = load_spec(find_preset("nas/cifar10"), overrides=overrides)
    with pytest.warns(UserWarning, match="synthetic"):
        result = bilevel.run(loaded, device="cpu", out=tmp_path, progress=False)
    assert result.result["engine"] == "darts" and result.result["steps"] == 2
    record = json.loads((tmp_path / "genotypes" / "step-000002.json").read_text())
    assert record["architecture"]["space"]["partial_channels"] == 2
    monitor = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]["monitor"]
    betas = torch.tensor(monitor["beta_normal"])
    assert betas.shape == (14,)
    # edge normalization: softmax over each node's incoming edges (2, 3, 4, 5 of them)
    sums = [float(betas[a:b].sum()) for a, b in ((0, 2), (2, 5), (5, 9), (9, 14))]
    assert sums == pytest.approx([1.0] * 4, abs=1e-5)
    assert "retrain_params" not in result.result["report"]  # report_kwargs: {retrain: false}


def test_cifar10_batches_load_from_a_local_folder(tmp_path: Path) -> None:
    from problems.nas import _read_batch, load_cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    data = load_cifar10(str(tmp_path))
    assert data["train"]["x"].shape == (20, 3, 32, 32) and data["test"]["y"].tolist() == [0, 1, 2, 3]
    assert not bool(data["source"]["synthetic"])
    evil = folder / "evil"
    evil.write_bytes(pickle.dumps({b"data": Path("x")}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _read_batch(evil)


def test_mixed_op_is_the_weighted_sum_and_partial_channels_keep_shapes() -> None:
    torch.manual_seed(0)
    ops = ["none", "skip_connect", "avg_pool_3x3", "sep_conv_3x3"]
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    weights = torch.softmax(torch.randn(4, dtype=torch.float64), 0)
    full = MixedOp("conv", ops, 8, 1).double()
    expected = sum(w * op(x) for w, op in zip(weights, full.ops))
    torch.testing.assert_close(full(x, weights), expected)
    for stride in (1, 2):
        partial = MixedOp("conv", ops, 8, stride, partial=4).double()
        out = partial(x, weights)
        assert out.shape == (2, 8, 6 // stride, 6 // stride)
    y = torch.arange(8.0).reshape(1, 8)
    assert channel_shuffle(y, 2).tolist() == [[0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]]


def test_random_cells_respect_the_space() -> None:
    loaded = load_spec(find_preset("nas/digits"))
    space = loaded.spec.levels["upper"].variables["arch"].space
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        genotype = random_genotype(space, generator)
        assert genotype.skip_count("normal") <= space.max_skip
        for cell in genotype.cells.values():
            assert len(cell) == 6 and all(op != "none" for op, _, _ in cell)
            for node in (2, 3, 4):
                sources = [s for _, s, d in cell if d == node]
                assert len(sources) == len(set(sources)) == 2 and all(s < node for s in sources)
        assert Genotype.from_json(json.loads(json.dumps(genotype.to_json()))) == genotype


def test_cell_drawing_numbers_nodes_as_the_genotype_does() -> None:
    """Edge [op, 0, 2] of the genotype is drawn from node '0: c_{k-2}' to node '2'."""
    from types import SimpleNamespace

    from bilevel.nas.draw import cell_drawing_graph, node_label
    from bilevel.nas.genotype import Genotype

    space = SimpleNamespace(cell=SimpleNamespace(inputs=2, nodes=3))
    cell = [["sep_conv_3x3", 0, 2], ["skip_connect", 1, 2], ["avg_pool_3x3", 2, 3], ["conv_3x3", 1, 4], ["max_pool_3x3", 3, 4]]
    graph = cell_drawing_graph(Genotype.from_json({"normal": cell}), space, "normal")
    assert [node_label(i, 2) for i in range(5)] == ["0: c_{k-2}", "1: c_{k-1}", "2", "3", "4"]
    drawn = {(u, v): d["op"] for u, v, d in graph.edges(data=True) if d["op"] != "concat"}
    assert drawn == {(node_label(s, 2), node_label(d, 2)): op for op, s, d in cell}
    assert {u for u, v, d in graph.edges(data=True) if d["op"] == "concat"} == {"2", "3", "4"}
