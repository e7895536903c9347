"""A bad spec gives one clear line per error (file, dotted path, what was expected), exit code 2
and no traceback, for every kind of mistake; malformed specs never crash (hypothesis)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bilevel.cli import app
from bilevel.spec import SpecError, load_spec, spec_from_data

SPECS = Path(__file__).parent / "specs"
GOOD = yaml.safe_load((SPECS / "good.yaml").read_text())
runner = CliRunner()


def _write(tmp_path: Path, data: dict, name: str = "spec.yaml") -> Path:
    (tmp_path / "user_objectives.py").write_text((SPECS / "user_objectives.py").read_text())
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _mutated(**changes) -> dict:
    data = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = data
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return data


_DELETE = object()


def _validate(path: Path, *extra: str):
    result = runner.invoke(app, ["validate", str(path), *extra])
    output = result.output + (result.stderr if hasattr(result, "stderr") and result.stderr_bytes is not None else "")
    return result.exit_code, output


def _expect_error(tmp_path: Path, data: dict, path_fragment: str, message_fragment: str, *extra: str) -> str:
    spec = _write(tmp_path, data)
    code, output = _validate(spec, *extra)
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert lines, output
    matching = [line for line in lines if path_fragment in line and message_fragment in line]
    assert matching, f"no error line names {path_fragment!r} with {message_fragment!r}:\n{output}"
    assert str(spec) in matching[0]
    return output


def test_the_good_spec_is_valid(tmp_path: Path) -> None:
    code, output = _validate(_write(tmp_path, GOOD))
    assert code == 0, output


CASES = {
    "unknown field": (dict(levels__lower__solver={"name": "sgd", "lrr": 0.1}), "levels.lower.solver.lrr", "unknown field"),
    "wrong type": (dict(levels__lower__solver={"name": "sgd", "lr": "fast"}), "levels.lower.solver.lr", "valid number"),
    "non-positive lr": (dict(levels__lower__solver={"name": "sgd", "lr": 0}), "levels.lower.solver.lr", "greater than 0"),
    "missing attribute": (dict(levels__lower__objective="user_objectives.py:nope"), "levels.lower.objective", "has no attribute"),
    "missing module": (dict(levels__lower__objective="no_such_module_xyz:f"), "levels.lower.objective", "cannot import module"),
    "missing file": (dict(levels__lower__objective="missing.py:f"), "levels.lower.objective", "not found"),
    "bad reference": (dict(levels__lower__objective="just_a_name"), "levels.lower.objective", "expected a reference"),
    "wrong signature": (dict(levels__lower__objective="user_objectives.py:two_args"), "levels.lower.objective", "expected signature"),
    "non-scalar objective": (dict(levels__lower__objective="user_objectives.py:vector_valued"), "levels.lower.objective", "expected a scalar"),
    "shape mismatch": (dict(levels__lower__variables={"w": {"shape": [5]}}), "levels.lower.objective", "check the shapes"),
    "cycle": (dict(levels__upper__parent="lower"), "levels", "cycle"),
    "unknown parent": (dict(levels__lower__parent="middle"), "levels", "not a level"),
    "duplicate variable": (dict(levels__lower__variables={"lam": {"shape": [4]}}), "levels", "unique"),
    "unknown engine": (dict(engine={"kind": "magic"}), "engine", "unknown kind"),
    "bad data source": (dict(levels__lower__data={"source": "user_objectives.py:not_a_mapping"}), "levels.lower.data.source", "expected a non-empty mapping"),
    "box low > high": (dict(levels__lower__variables={"w": {"shape": [4], "set": {"low": 1, "high": 0}}}), "levels.lower.variables.w.set", "must not exceed"),
    "lower level without solver": (dict(levels__lower__solver=_DELETE), "levels.lower.solver", "inner solver"),
    "missing objective": (dict(levels__lower__objective=_DELETE), "levels.lower.objective", "required"),
    "one level": (dict(levels={"upper": GOOD["levels"]["upper"]}), "levels", "at least two levels"),
    "infeasible constraint": (
        dict(levels__lower__constraints=[{"fn": "user_objectives.py:positive_constraint"}]),
        "levels.lower.constraints.0", "infeasible at the initial",
    ),
    "constraint shape": (
        dict(levels__lower__constraints=[{"fn": "user_objectives.py:sum_constraint", "kind": "equality", "shape": [2]}]),
        "levels.lower.constraints.0.shape", "declared [2]",
    ),
    "constraint to an engine that cannot take it": (
        dict(levels__lower__constraints=[{"fn": "user_objectives.py:sum_constraint", "kind": "equality", "coupled": True}],
             engine={"kind": "implicit"}),
        "levels.lower.constraints", "cannot handle lower-level constraints",
    ),
    "report argument of the wrong type": (
        dict(report="user_objectives.py:annotated_report", report_kwargs={"settings": {"fraction": 0.5}, "repeats": "many"}),
        "report_kwargs.repeats", "valid integer",
    ),
    "report argument outside its model's range": (
        dict(report="user_objectives.py:annotated_report", report_kwargs={"settings": {"fraction": 1.5}}),
        "report_kwargs.settings.fraction", "less than or equal to 1",
    ),
    "unknown field in a report argument's model": (
        dict(report="user_objectives.py:annotated_report", report_kwargs={"settings": {"fraction": 0.5, "lable": "x"}}),
        "report_kwargs.settings.lable", "unknown field of the settings argument",
    ),
    "normalized momentum as inner solver": (
        dict(levels__lower__solver={"name": "normalized_momentum", "lr": 0.1}), "levels.lower.solver.name", "outer",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_gives_a_clear_error(case: str, tmp_path: Path) -> None:
    changes, path, message = CASES[case]
    _expect_error(tmp_path, _mutated(**changes), path, message)


def test_annotated_report_arguments_pass_as_written(tmp_path: Path) -> None:
    """Arguments that match the annotations validate; an unannotated one is not checked."""
    data = _mutated(report="user_objectives.py:annotated_report",
                    report_kwargs={"settings": {"fraction": 0.25}, "repeats": 3, "plot": {"anything": [1, "x"]}})
    code, output = _validate(_write(tmp_path, data))
    assert code == 0, output


def test_an_override_inside_a_yaml_anchor_changes_every_alias(tmp_path: Path) -> None:
    """A value declared once with an anchor stays one value under --set; replacing an aliased node
    itself changes that place only."""
    _write(tmp_path, GOOD, "anchored.yaml")
    with (tmp_path / "anchored.yaml").open("a") as spec:
        spec.write("report: user_objectives.py:annotated_report\n"
                   "report_kwargs: {settings: &shared {fraction: 0.5}, repeats: 2, plot: *shared}\n")
    changed = load_spec(tmp_path / "anchored.yaml", ["report_kwargs.settings.fraction=0.125"]).spec.report_kwargs
    assert changed["settings"]["fraction"] == changed["plot"]["fraction"] == 0.125
    replaced = load_spec(tmp_path / "anchored.yaml", ["report_kwargs.plot={fraction: 0.75}"]).spec.report_kwargs
    assert replaced["settings"]["fraction"] == 0.5 and replaced["plot"]["fraction"] == 0.75
    # and the shared copy is still validated where it is used
    code, output = _validate(tmp_path / "anchored.yaml", "--set", "report_kwargs.settings.fraction=2")
    assert code == 2 and "report_kwargs.settings.fraction" in output, output


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nlevels:\n  upper: {variables: [\n")
    code, output = _validate(spec)
    assert code == 2 and "Traceback" not in output
    assert f"{spec}:4" in output or f"{spec}:3" in output, output
    assert "invalid YAML" in output


def test_errors_carry_line_numbers(tmp_path: Path) -> None:
    output = _expect_error(tmp_path, _mutated(levels__lower__solver={"name": "sgd", "lr": -1}), "levels.lower.solver.lr", "greater than 0")
    assert "spec.yaml:" in output.split("levels.lower.solver.lr")[0]


def test_non_mapping_top_level(tmp_path: Path) -> None:
    spec = tmp_path / "list.yaml"
    spec.write_text("- 1\n- 2\n")
    code, output = _validate(spec)
    assert code == 2 and "expected a mapping" in output


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    data = _mutated(levels__lower__solver={"name": "sgd", "lr": -1}, engine={"kind": "magic"})
    spec = _write(tmp_path, data)
    code, output = _validate(spec)
    assert code == 2
    assert "levels.lower.solver.lr" in output and "engine" in output


def test_unknown_engine_on_the_command_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["hypergrad", str(_write(tmp_path, GOOD)), "--engine", "magic", "--json"])
    assert result.exit_code == 2 and "unknown engine 'magic'" in result.output


def test_missing_spec_file(tmp_path: Path) -> None:
    code, output = _validate(tmp_path / "nope.yaml")
    assert code == 2 and "no such file" in output


def test_real_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    spec = _write(tmp_path, _mutated(levels__upper__parent="lower"))
    proc = subprocess.run([sys.executable, "-m", "bilevel", "validate", str(spec)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cycle" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    debug = subprocess.run([sys.executable, "-m", "bilevel", "--debug", "validate", str(spec)], capture_output=True, text=True)
    assert "Traceback" in debug.stderr


def test_python_api_raises_spec_error_with_issues() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_data(_mutated(levels__lower__solver={"name": "sgd", "lr": -1}))
    assert info.value.issues[0].path == "levels.lower.solver.lr"
    with pytest.raises(SpecError):
        load_spec(SPECS / "does-not-exist.yaml")


# --- fuzzing -----------------------------------------------------------------------------------
def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


ALL_PATHS = [p for p in _paths(GOOD) if p]
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def malformed(draw):
    data = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(ALL_PATHS))
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            action = draw(st.sampled_from(["delete", "replace", "extra"]))
            if action == "delete" and isinstance(node, dict):
                node.pop(path[-1], None)
            elif action == "extra" and isinstance(node, dict):
                node[draw(st.text(min_size=1, max_size=6))] = draw(junk)
            else:
                node[path[-1]] = draw(junk)
        except (KeyError, IndexError, TypeError):
            pass
    return data


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(malformed())
def test_malformed_specs_only_raise_spec_errors(data) -> None:
    try:
        spec_from_data(data)
    except SpecError as exc:
        assert exc.issues and all(str(issue) for issue in exc.issues)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(malformed())
def test_malformed_specs_never_show_a_traceback(tmp_path_factory, data) -> None:
    tmp_path = tmp_path_factory.mktemp("fuzz")
    spec = _write(tmp_path, data)
    code, output = _validate(spec)
    assert code in (0, 2), output
    assert "Traceback" not in output


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_random_text_never_crashes_the_loader(text) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "random.yaml"
        spec.write_text(text)
        try:
            load_spec(spec)
        except SpecError:
            pass
