"""The spec a run ran, as validated (overrides applied), kept in its directory (``spec.json``)
so that later commands (``bilevel meta-test``) compile the same problem."""

from __future__ import annotations

import json
from pathlib import Path

from bilevel.runtime.atomic import atomic_write_json
from bilevel.spec.errors import SpecError
from bilevel.spec.load import LoadedSpec, spec_from_data

__all__ = ["SPEC_RECORD", "load_spec_record", "write_spec_record"]

SPEC_RECORD = "spec.json"


def write_spec_record(out_dir: Path, loaded: LoadedSpec, fingerprint: str) -> None:
    """spec.json: the spec, where it was read from, and its fingerprint (which problem this is)."""
    atomic_write_json(out_dir / SPEC_RECORD, {"file": loaded.file, "base_dir": str(loaded.base_dir), "fingerprint": fingerprint,
                                              "spec": loaded.spec.model_dump(mode="json")})


def load_spec_record(run_dir: Path) -> LoadedSpec:
    """The spec of the run in ``run_dir`` (a SpecError when the directory holds none)."""
    path = Path(run_dir) / SPEC_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError.single(str(path), "", f"not the record of a bilevel run ({exc})") from None
    return spec_from_data(record["spec"], record["file"], Path(record["base_dir"]))
