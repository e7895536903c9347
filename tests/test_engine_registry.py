"""An engine is one file plus a registration: an engine defined outside the package (a spec's
``plugins``) validates in specs, is planned with its own reasons and runs through the CLI; the
planner chooses between engines with the same capabilities by declared priority only (never by
name); the spec's engine union, the JSON schema and ``bilevel engines`` follow the registry."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch

from bilevel.compile import compile_spec
from bilevel.engines import PenaltyEngine, Proposal, engine_kinds, register, unregister
from bilevel.engines.penalty import PenaltyConfig
from bilevel.planner import make_plan
from bilevel.spec import SpecError, spec_from_data, spec_schema
from bilevel.spec.engine import EngineConfig
from oracles import quadratic_solution, rel_error
from problems.toy import quadratic_spec

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SPEC = ROOT / "examples" / "new_engine" / "spec.yaml"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# --- an engine from a file outside the package, through the CLI (each command its own process) ----------
def test_an_engine_from_a_plugin_file_is_planned_and_run_with_its_own_reasons(tmp_path: Path) -> None:
    assert _cli("validate", str(PLUGIN_SPEC), cwd=tmp_path).returncode == 0
    plan = json.loads(_cli("plan", str(PLUGIN_SPEC), "--json", cwd=tmp_path).stdout)
    assert plan["engine"] == "f2sa" and plan["config"]["lam_max"] == 100.0
    assert len(plan["reasons"]) == 1 and "f2sa follows the value-function penalty" in plan["reasons"][0]
    assert "Kwon et al. 2023" in plan["reasons"][0] and "V-PBGD" not in plan["reasons"][0]
    hyper = json.loads(_cli("hypergrad", str(PLUGIN_SPEC), "--json", cwd=tmp_path).stdout)
    assert hyper["engine"] == "f2sa" and not hyper["is_hypergradient"] and len(hyper["hypergradient"]["x"]) == 3
    assert hyper["stats"]["hvp_count"] == 0
    out = tmp_path / "run"
    done = _cli("run", str(PLUGIN_SPEC), "--out", str(out), "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["engine"] == "f2sa" and result["status"] == "completed"
    # the penalty's fixed point is biased by O(1/lam): 1e-3 here (lam = 100, lower eigenvalues in [1, 10])
    x = torch.tensor(result["upper_variables"]["x"], dtype=torch.float64)
    assert rel_error(x, quadratic_solution()) < 2e-3
    explicit = json.loads(_cli("plan", str(PLUGIN_SPEC), "--json", "--engine", "penalty", cwd=tmp_path).stdout)
    assert explicit["engine"] == "penalty"


def test_bilevel_engines_and_the_schema_list_a_plugin_engine(tmp_path: Path) -> None:
    plugin = str(PLUGIN_SPEC.parent / "f2sa.py")
    listed = json.loads(_cli("engines", "--json", "--plugin", plugin, cwd=tmp_path).stdout)
    assert listed["f2sa"]["priority"] == 65 and listed["f2sa"]["first_order"] is True
    schema = json.loads(_cli("schema", "--plugin", plugin, cwd=tmp_path).stdout)
    assert "F2SAConfig" in schema["$defs"]
    assert "F2SAConfig" not in json.loads(_cli("schema", cwd=tmp_path).stdout)["$defs"]


def test_a_missing_plugin_is_a_spec_error_at_its_path(tmp_path: Path) -> None:
    data = {**quadratic_spec().model_dump(mode="json"), "plugins": ["nowhere.py"]}
    (tmp_path / "spec.json").write_text(json.dumps(data))
    done = _cli("validate", str(tmp_path / "spec.json"), cwd=tmp_path)
    assert done.returncode == 2 and "plugins.0" in done.stderr and "nowhere.py" in done.stderr
    assert "Traceback" not in done.stderr


# --- priorities, not names ---------------------------------------------------------------------------
def _penalty_like(kind: str, priority: int) -> type:
    """An engine with the penalty engine's capabilities and algorithm, under another name and priority."""
    config = type(f"{kind}Config", (EngineConfig,), {"__annotations__": {"kind": Literal[kind]}, "kind": kind,  # type: ignore[valid-type]
                                                     "__doc__": "Test engine."})

    class Engine(PenaltyEngine):
        Config: ClassVar[type] = config

        @classmethod
        def configure(cls, facts: Any, situation: str) -> Proposal | None:
            if situation != "nonconvex":
                return None
            return Proposal(PenaltyConfig(), [f"the {cls.kind} engine's own reason"])

        def __init__(self, cfg: Any = None):
            super().__init__(PenaltyConfig())

    Engine.kind = kind
    Engine.priority = priority
    return Engine


@pytest.fixture
def registered() -> Iterator[list[str]]:
    kinds: list[str] = []
    yield kinds
    for kind in kinds:
        unregister(kind)


def _nonconvex_plan() -> Any:
    data = quadratic_spec().model_dump(mode="json")
    data["levels"]["lower"]["assumptions"]["convexity"] = "nonconvex"
    return make_plan(compile_spec(spec_from_data(data)))


def test_an_engine_with_the_same_capabilities_is_chosen_only_by_priority(registered: list[str]) -> None:
    register(_penalty_like("aaa_penalty", priority=10))  # sorts before "penalty", ranks below it
    registered.append("aaa_penalty")
    plan = _nonconvex_plan()
    assert plan.engine.kind == "penalty" and "the penalty engine" not in plan.reasons[0]
    register(_penalty_like("zzz_penalty", priority=61))  # sorts after "penalty", ranks above it
    registered.append("zzz_penalty")
    plan = _nonconvex_plan()
    assert plan.reasons == ["the zzz_penalty engine's own reason"]


def test_two_engines_cannot_share_a_priority(registered: list[str]) -> None:
    with pytest.raises(TypeError, match="priority 60"):
        register(_penalty_like("tied_penalty", priority=PenaltyEngine.priority))
    assert "tied_penalty" not in engine_kinds()


def test_the_spec_union_and_schema_follow_the_registry(registered: list[str]) -> None:
    data = {**quadratic_spec().model_dump(mode="json"), "engine": {"kind": "mid_penalty"}}
    with pytest.raises(SpecError) as unknown:
        spec_from_data(data)
    assert unknown.value.issues[0].path == "engine" and "unknown kind" in unknown.value.issues[0].message
    register(_penalty_like("mid_penalty", priority=33))
    registered.append("mid_penalty")
    assert spec_from_data(data).spec.engine.kind == "mid_penalty"
    assert "mid_penaltyConfig" in spec_schema()["$defs"]


def test_a_config_whose_kind_does_not_match_is_refused() -> None:
    engine = _penalty_like("wrongly_named", priority=34)
    engine.kind = "other_name"
    with pytest.raises(TypeError, match="kind defaults to 'wrongly_named'"):
        register(engine)


def test_a_spec_naming_a_builtin_engine_loads_with_only_the_spec_package_imported() -> None:
    """In a fresh interpreter, ``bilevel.spec.load_spec`` (or ``bilevel.load_spec``) accepts
    ``engine.kind`` of every built-in engine, without importing ``bilevel.engines`` first."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = ("from bilevel.spec import load_spec\n"
            "print(load_spec('problems/meta/digits_imaml.yaml').spec.engine.kind)\n"
            "print(load_spec('problems/hyperclean/digits.yaml', ['engine.kind=unrolled']).spec.engine.kind)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["implicit", "unrolled"]
