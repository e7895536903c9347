"""The trust model: a spec's references are code. With an allow list (BILEVEL_ALLOW_IMPORTS, the
CLI's --allow-imports) nothing outside it is imported, every excluded reference is reported at
its dotted path before any import, and files are allowed only inside the spec's folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from bilevel.refs import ALLOW_IMPORTS_ENV
from bilevel.spec import SpecError, load_spec
from bilevel.spec.references import spec_references

HERE = Path(__file__).parent
GOOD = HERE / "specs" / "good.yaml"


def _hostile(tmp_path: Path, marker: Path) -> Path:
    shutil.copy(HERE / "specs" / "user_objectives.py", tmp_path / "user_objectives.py")
    data = yaml.safe_load(GOOD.read_text())
    data["levels"]["upper"]["data"] = {"source": "os:system", "kwargs": {"command": f"touch {marker}"}}
    data["plugins"] = ["subprocess"]
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_every_reference_is_listed_with_its_path() -> None:
    refs = spec_references(yaml.safe_load(GOOD.read_text()))
    assert refs == [("levels.upper.objective", "user_objectives.py:upper"), ("levels.upper.data.source", "user_objectives.py:data"),
                    ("levels.lower.objective", "user_objectives.py:lower"), ("levels.lower.data.source", "user_objectives.py:data")]
    assert spec_references({"levels": {"a": {"objective_kwargs": {"objective": "os:system"}}}}) == []  # user values


def test_an_allow_list_refuses_every_excluded_reference_before_importing_any(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "ran"
    spec = _hostile(tmp_path, marker)
    monkeypatch.setenv(ALLOW_IMPORTS_ENV, "numpy")
    with pytest.raises(SpecError) as caught:
        load_spec(spec)
    paths = sorted(issue.path for issue in caught.value.issues)
    assert paths == ["levels.upper.data.source", "plugins.0"]
    assert all("not allowed by --allow-imports" in issue.message for issue in caught.value.issues)
    assert not marker.exists()


def test_files_outside_the_spec_folder_are_refused_under_an_allow_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(GOOD.read_text())
    outside = str((HERE / "specs" / "user_objectives.py").resolve())
    data["levels"]["lower"]["objective"] = f"{outside}:lower"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(HERE / "specs" / "user_objectives.py", tmp_path / "user_objectives.py")
    monkeypatch.setenv(ALLOW_IMPORTS_ENV, "")
    with pytest.raises(SpecError, match="outside the spec's folder"):
        load_spec(tmp_path / "spec.yaml")
    data["levels"]["lower"]["objective"] = "user_objectives.py:lower"  # the spec's own file: allowed
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    assert load_spec(tmp_path / "spec.yaml").spec.name == "good"


def test_without_an_allow_list_references_import_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_IMPORTS_ENV, raising=False)
    assert load_spec(GOOD).spec.name == "good"
