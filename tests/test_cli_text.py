"""What the command line prints: help text, --debug anywhere, the hypergradient summary, numbers,
a closed output pipe, progress in logs, the thread default, the known-optimum line."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer.main
import yaml
from typer.testing import CliRunner

from bilevel.cli import app, gradient_summary
from bilevel.reporting.numbers import format_mapping, format_number
from bilevel.runtime.callbacks import Progress
from bilevel.runtime.threads import DEFAULT_THREADS, configure_threads
from bilevel.spec import SpecError
from problems.toy import quadratic_spec

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.fixture(scope="module")
def quad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The closed-form quadratic (problems.toy) as a spec file: 100 inner steps, 10 outer ones."""
    data = quadratic_spec(inner_steps=100).model_dump(mode="json")
    data["run"].update(steps=10, checkpoint_every=None)
    path = tmp_path_factory.mktemp("specs") / "quadratic.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _keep_threads():
    """The CLI sets torch's thread count; give the next test the count it had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None, **kwargs) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=300, **kwargs)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_like_a_man_page(command: str) -> None:
    """No typer type placeholders (<bool>, <str>, <list[str]>), no {argument}: arguments by their
    metavar, descriptions whole (click's plain formatter, not narrow rich columns)."""
    text = runner.invoke(app, [command, "--help"]).output
    assert not re.search(r"<(bool|str|int|float|path|list\[str\])>", text), text
    assert "{" not in text.split("\n\n")[0], text  # the usage line
    usage = text.splitlines()[0]
    assert usage.startswith(f"Usage: bilevel {command}")
    assert "--debug" in text  # accepted after the command's name too
    for line in text.splitlines():
        assert "│" not in line and "╭" not in line, line  # no rich boxes


def test_usage_lines_name_the_arguments() -> None:
    assert runner.invoke(app, ["retrain", "--help"]).output.startswith("Usage: bilevel retrain [OPTIONS] RUN_DIR\n")
    assert runner.invoke(app, ["run", "--help"]).output.startswith("Usage: bilevel run [OPTIONS] [SPEC]\n")
    assert runner.invoke(app, ["report", "--help"]).output.startswith("Usage: bilevel report [OPTIONS] RUN_DIR...\n")
    top = runner.invoke(app, ["--help"]).output
    commands = top.split("Commands:")[1]
    assert "..." not in commands  # every command's one-line description is whole
    assert set(COMMANDS) == {line.split()[0] for line in commands.strip().splitlines()}


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_before_or_after_the_command(quad: Path, position: str) -> None:
    args = ["plan", str(quad), "--set", "run.steps=x"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 2 and "run.steps" in plain.output and plain.exception is None or isinstance(plain.exception, SystemExit)
    debugged = runner.invoke(app, ["--debug", *args] if position == "before" else [*args, "--debug"])
    assert isinstance(debugged.exception, SpecError)  # re-raised: the traceback is shown


def test_hypergrad_summary_prints_whole_numbers(quad: Path) -> None:
    as_json = json.loads(runner.invoke(app, ["hypergrad", str(quad), "--json"]).output)
    text = runner.invoke(app, ["hypergrad", str(quad)]).output
    (line,) = [ln for ln in text.splitlines() if "d upper / d x" in ln]
    entries = as_json["hypergradient"]["x"]
    norm = sum(v * v for v in entries) ** 0.5
    assert f"shape [{len(entries)}]" in line and f"norm {format_number(norm)}" in line
    first = line.split("first: ")[1].split()
    assert [float(v) for v in first if v != "..."] == pytest.approx(entries[:5], rel=1e-5)
    stats = next(ln for ln in text.splitlines() if "stats:" in ln)
    for key, value in as_json["stats"].items():
        if key != "time_s":  # a second call, another time
            assert f"{key} {format_number(value)}" in stats
    assert re.search(r"time_s \d", stats)


def test_gradient_summary_of_a_matrix_and_a_scalar() -> None:
    line = gradient_summary("net.weight", [[3.0, -4.0], [0.0, 1e-7]])
    assert line == "d upper / d net.weight: shape [2, 2], norm 5, max |entry| 4; first: 3 -4 0 1e-07"
    assert gradient_summary("lam", 0.123456789) == "d upper / d lam: 0.123457"


def test_format_number_keeps_small_values_and_cuts_long_floats() -> None:
    assert format_number(1e-5) == "1e-05" and format_number(0.9360100376411543) == "0.93601"
    assert format_number(150) == "150" and format_number(True) == "true" and format_number(None) == "-"
    assert format_number(float("nan")) == "nan"
    assert format_mapping({"hvp_count": 20, "time_s": 0.44112345}) == "hvp_count 20  time_s 0.441123"


def test_run_summary_formats_report_values_alike(quad: Path, tmp_path: Path) -> None:
    """A report value of 1e-5 reads 1e-05, not 0.0000; floats carry 6 significant digits."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text("def report(upper, lower):\n    return {'tiny': 1e-5, 'long': 0.9360100376411543, 'count': 307}\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**yaml.safe_load(quad.read_text()), "report": f"{hooks}:report"}))
    result = runner.invoke(app, ["run", str(spec), "-q", "--out", str(tmp_path / "r"), "--set", "run.steps=3"])
    assert result.exit_code == 0, result.output
    assert "  tiny: 1e-05\n  long: 0.93601\n  count: 307\n" in result.output


def test_a_closed_pipe_ends_quietly(quad: Path) -> None:
    """`bilevel plan | head -1`: no BrokenPipeError, no 'Exception ignored', exit code 141. The
    reader `true` exits at once, so that every write meets a closed pipe."""
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m bilevel plan {quad} | true"],
                           capture_output=True, text=True, timeout=120)
    assert shell.stderr == "", shell.stderr
    assert shell.returncode == 141
    head = subprocess.run(["bash", "-c", f"{sys.executable} -m bilevel plan {quad} | head -1"], capture_output=True,
                          text=True, timeout=120)
    assert head.stdout == "engine: implicit\n" and head.stderr == ""


def test_progress_in_a_log_is_plain_lines_with_the_whole_step_counter() -> None:
    stream = io.StringIO()
    progress = Progress(150, 0, True, "hyperclean-digits [implicit]", stream=stream)
    for step in range(1, 151):
        progress.update(step, 0.25 + 1e-3 / step, 1e-5)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("hyperclean-digits [implicit]: step 15/150  upper loss 0.250067  |hypergrad| 1e-05  elapsed ")
    assert lines[-1].startswith("hyperclean-digits [implicit]: step 150/150  ")
    silent = io.StringIO()
    Progress(10, 0, False, "x", stream=silent).update(10, 1.0, 1.0)
    assert silent.getvalue() == ""


def test_a_logged_run_keeps_stdout_for_results(quad: Path, tmp_path: Path) -> None:
    run = _cli("run", str(quad), "--out", str(tmp_path / "r"), "--set", "run.steps=20")
    assert run.returncode == 0, run.stderr
    assert "toy-quadratic [implicit]: step 20/20  upper loss " in run.stderr
    assert "[implicit]: step" not in run.stdout
    assert run.stdout.startswith("engine: implicit  steps: 20  final upper loss: ")


def test_threads_default_to_one_and_are_overridable(quad: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BILEVEL_THREADS"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "a"
    assert runner.invoke(app, ["run", str(quad), "-q", "--out", str(out), "--set", "run.steps=2"]).exit_code == 0
    result = json.loads((out / "result.json").read_text())
    assert result["threads"] == DEFAULT_THREADS == 1
    assert runner.invoke(app, ["run", str(quad), "-q", "--out", str(out), "--set", "run.steps=2", "--threads", "2"]).exit_code == 0
    assert json.loads((out / "result.json").read_text())["threads"] == 2
    assert runner.invoke(app, ["--threads", "2", "run", str(quad), "-q", "--out", str(out), "--set", "run.steps=2"]).exit_code == 0
    assert json.loads((out / "result.json").read_text())["threads"] == 2
    bad = runner.invoke(app, ["run", str(quad), "--threads", "0"])
    assert bad.exit_code == 2 and "error: --threads: expected a positive integer" in bad.output

    assert configure_threads().source == "default" and torch.get_num_threads() == 1
    monkeypatch.setenv("BILEVEL_THREADS", "2")
    assert configure_threads() == configure_threads.__globals__["ThreadSetting"](2, "BILEVEL_THREADS")
    monkeypatch.setenv("BILEVEL_THREADS", "many")
    with pytest.raises(ValueError, match="BILEVEL_THREADS"):
        configure_threads()
    monkeypatch.delenv("BILEVEL_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert configure_threads().source == "OMP_NUM_THREADS" and torch.get_num_threads() == 2  # left as torch set it


def test_known_optimum_line_on_a_toy_preset(tmp_path: Path) -> None:
    reached = runner.invoke(app, ["run", "toy/three_level", "-q", "--out", str(tmp_path / "a")])
    assert reached.exit_code == 0, reached.output
    assert re.search(r"^known optimum a\* \(closed form\): reached \(relative distance .* <= 1e-06\)$", reached.output, re.M)
    short = runner.invoke(app, ["run", "toy/three_level", "-q", "--out", str(tmp_path / "b"), "--set", "run.steps=3"])
    assert re.search(r"^known optimum a\* \(closed form\): not reached \(.* > 1e-06\)$", short.output, re.M)
    written = json.loads((tmp_path / "b" / "result.json").read_text())["report"]["known_optimum"]
    assert written["reached"] is False and written["error"] > written["tolerance"]
