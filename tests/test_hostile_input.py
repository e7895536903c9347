"""Input a parser accepts but a user did not mean, and files that are not specs: each is refused
with exit code 2, one line naming the file, line and field, and no traceback. Duplicate keys
(YAML and JSON, at the top and inside a level; merge keys may still be overridden), non-finite
numbers (in the file, in --set, from Python), an objective that is not finite at the initial
variables, a YAML alias bomb (refused in well under a second), nesting too deep to read, binary
and non-UTF-8 files, a checkpoint given as the spec, malformed --set, an unknown --device, and a
shape too large for the machine. Hypothesis properties: a duplicated key anywhere is reported at
its path with both lines; a non-finite number anywhere is reported at its path."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bilevel.cli import app
from bilevel.spec import SpecError, load_spec, spec_from_data

SPECS = Path(__file__).parent / "specs"
GOOD_TEXT = (SPECS / "good.yaml").read_text()
GOOD = yaml.safe_load(GOOD_TEXT)
runner = CliRunner()


def _file(tmp_path: Path, text: str | bytes, name: str = "spec.yaml") -> Path:
    (tmp_path / "user_objectives.py").write_text((SPECS / "user_objectives.py").read_text())
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _refused(path: Path, *extra: str, command: str = "validate") -> list[str]:
    """The error lines of a refused spec (exit 2, no traceback, every line naming the file)."""
    result = runner.invoke(app, [command, str(path), *extra])
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert lines and all(line.startswith(f"error: {path}") or line.startswith("error: --") for line in lines), output
    return lines


# --- duplicate keys ------------------------------------------------------------------------------------
def test_a_duplicate_key_inside_a_level_names_both_lines(tmp_path: Path) -> None:
    text = GOOD_TEXT.replace("      w: {shape: [4]}\n", "      w: {shape: [4]}\n    objective: user_objectives.py:upper\n", 1)
    (line,) = _refused(_file(tmp_path, text))
    first = text.splitlines().index("      w: {shape: [4]}") + 2  # the inserted key, then the level's own
    second = first + 1
    assert "levels.lower.objective" in line and f"lines {first} and {second}" in line and f"spec.yaml:{second}" in line


def test_a_duplicate_top_level_key_is_refused_rather_than_the_last_one_winning(tmp_path: Path) -> None:
    text = GOOD_TEXT.replace("run: {steps: 2, device: cpu}", "run: {steps: 3, device: cpu}\nrun: {steps: 400000, device: cpu}")
    (line,) = _refused(_file(tmp_path, text))
    assert ": run: duplicate key 'run'" in line


def test_a_duplicate_key_in_json_is_refused(tmp_path: Path) -> None:
    text = json.dumps(GOOD)[:-1] + ', "name": "again"}'
    (line,) = _refused(_file(tmp_path, text, "spec.json"))
    assert "duplicate key 'name'" in line


def test_a_merge_key_may_still_be_overridden(tmp_path: Path) -> None:
    text = GOOD_TEXT.replace("    solver: {name: sgd, lr: 0.1, steps: 20}",
                             "    solver:\n      <<: {name: sgd, lr: 0.1, steps: 5}\n      steps: 20")
    loaded = load_spec(_file(tmp_path, text))
    assert loaded.spec.levels["lower"].solver.steps == 20


# --- numbers and objective values ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_non_finite_number_is_refused_at_its_line(tmp_path: Path, value: str) -> None:
    text = GOOD_TEXT.replace("solver: {name: sgd, lr: 0.1}", f"solver: {{name: sgd, lr: {value}}}", 1)
    (line,) = _refused(_file(tmp_path, text))
    assert "spec.yaml:8: levels.upper.solver.lr" in line and "not a finite number" in line


def test_a_non_finite_override_and_init_are_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, GOOD_TEXT)
    (line,) = _refused(path, "--set", "levels.upper.variables.lam.init=.nan")
    assert "levels.upper.variables.lam.init: nan is not a finite number" in line
    data = copy.deepcopy(GOOD)
    data["levels"]["lower"]["solver"]["lr"] = float("inf")
    with pytest.raises(SpecError) as info:
        spec_from_data(data)
    assert info.value.issues[0].path == "levels.lower.solver.lr"


def test_an_objective_not_finite_at_the_initial_variables_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, GOOD_TEXT.replace("objective: user_objectives.py:upper", "objective: nan_objective.py:upper"))
    (tmp_path / "nan_objective.py").write_text("import torch\n\ndef upper(upper, lower, batch):\n"
                                               "    return torch.log(upper['lam'] - upper['lam'])\n")
    (line,) = _refused(path)
    assert "levels.upper.objective" in line and "-inf at the initial variables, expected a finite number" in line


# --- files that are not specs -----------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]\n"
    began = time.perf_counter()
    (line,) = _refused(_file(tmp_path, text))
    assert time.perf_counter() - began < 5.0 and "through YAML aliases" in line


@pytest.mark.parametrize("name, text", [("deep.yaml", "a: " + "[" * 20000 + "]" * 20000 + "\n"),
                                        ("deep.json", "[" * 100000 + "]" * 100000)])
def test_nesting_too_deep_to_read_is_refused(tmp_path: Path, name: str, text: str) -> None:
    (line,) = _refused(_file(tmp_path, text, name))
    assert "nested too deeply" in line


@pytest.mark.parametrize("content, message", [(b"PK\x03\x04\x00\x00binary", "zip archive"),
                                              ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text"),
                                              (b"name: x\x00\x01\x02", "NUL bytes")])
def test_binary_and_non_utf8_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (line,) = _refused(_file(tmp_path, content))
    assert message in line


def test_a_checkpoint_given_as_the_spec_is_refused(tmp_path: Path) -> None:
    import torch

    torch.save({"step": 1}, tmp_path / "checkpoint.pt")
    (line,) = _refused(tmp_path / "checkpoint.pt")
    assert "zip archive (a torch checkpoint" in line


def test_a_directory_given_as_the_spec_is_refused(tmp_path: Path) -> None:
    (line,) = _refused(tmp_path)
    assert "is a directory" in line


# --- the command line --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, message", [("levels.upper.solver.lr=[1, 2", "cannot read the value"),
                                               ("=5", "non-empty dotted path"), ("levels..lr=1", "non-empty dotted path")])
def test_a_malformed_override_is_one_clear_line(tmp_path: Path, override: str, message: str) -> None:
    (line,) = _refused(_file(tmp_path, GOOD_TEXT), "--set", override)
    assert message in line and "\n" not in line


def test_an_unknown_device_is_refused(tmp_path: Path) -> None:
    (line,) = _refused(_file(tmp_path, GOOD_TEXT), "--device", "tpu", "--json", command="hypergrad")
    assert "unknown device 'tpu'" in line


def test_a_shape_too_large_for_the_machine_is_refused_at_validate_time(tmp_path: Path) -> None:
    text = GOOD_TEXT.replace("w: {shape: [4]}", "w: {shape: [4000000, 4000000]}")
    (line,) = _refused(_file(tmp_path, text))
    assert "levels.lower.variables.w.shape" in line and "more than the cpu memory" in line



def test_an_initial_value_beyond_the_dtype_is_refused_at_its_path(tmp_path: Path) -> None:
    """A finite number too large for float32 (found by the property below): refused, not an overflow."""
    (line,) = _refused(_file(tmp_path, GOOD_TEXT), "--set", "levels.upper.variables.lam.init=3.402823466385289e+38")
    assert "levels.upper.variables.lam.init: 3.402823466385289e+38 does not fit in float32" in line

# --- properties ----------------------------------------------------------------------------------------------
def _mapping_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    out = []
    if isinstance(node, dict):
        out.append(prefix)
        for key, value in node.items():
            out += _mapping_paths(value, (*prefix, key))
    return out


def _number_paths(node: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _number_paths(value, (*prefix, key))]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [prefix]
    return []


def _block_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(_mapping_paths(GOOD)), st.data())
def test_any_duplicated_key_is_reported_at_its_path_with_both_lines(tmp_path_factory, where: tuple, data) -> None:
    node = GOOD
    for key in where:
        node = node[key]
    key = data.draw(st.sampled_from(sorted(node)))
    text = _block_yaml(GOOD)
    # duplicate the key's line at the same indentation right after the mapping's first key
    lines = text.splitlines()
    indent = "  " * len(where)
    cursor = 0
    for level, name in enumerate(where):
        cursor = next(i for i in range(cursor, len(lines)) if lines[i].startswith("  " * level + f"{name}:"))
        cursor += 1
    position = next(i for i in range(cursor, len(lines)) if lines[i].startswith(f"{indent}{key}:"))
    end = position + 1  # after the key's whole block (its nested lines are indented deeper)
    while end < len(lines) and lines[end].startswith((indent + "  ", indent + "- ")):
        end += 1
    lines.insert(end, f"{indent}{key}: 1")
    path = tmp_path_factory.mktemp("dup") / "spec.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    (issue,) = info.value.issues
    assert issue.path == ".".join(map(str, (*where, key))) and f"lines {position + 1} and {end + 1}" in issue.message
    assert issue.line == end + 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(_number_paths(GOOD)), st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_any_non_finite_number_is_reported_at_its_path(where: tuple, value: float) -> None:
    data = copy.deepcopy(GOOD)
    node = data
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(SpecError) as info:
        spec_from_data(data)
    assert [issue.path for issue in info.value.issues] == [".".join(where)]
