"""The documentation's commands run, and print what the pages show (tests/docs_harness.py says
how blocks are found, steered by `<!-- doc-test: ... -->` comments, and compared).

Every page with a command block is a case; the blocks marked slow run in the second case of
their page, under `pytest -m slow`, together with the others of the page (later blocks can need
what earlier ones wrote)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from docs_harness import ROOT, Block, Session, check_block, page_blocks, page_state

PAGES = sorted(
    [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("problems/*/README.md"),
     *ROOT.glob("examples/**/README.md")]
)
WITH_BLOCKS = {page: page_blocks(page) for page in PAGES}
RUNNABLE = [page for page, blocks in WITH_BLOCKS.items() if any(not b.directives.skip for b in blocks)]
WITH_SLOW = [page for page in RUNNABLE if any(b.directives.slow and not b.directives.skip for b in WITH_BLOCKS[page])]


def _ids(pages: list[Path]) -> list[str]:
    return [str(page.relative_to(ROOT)) for page in pages]


def _run_page(page: Path, tmp_path: Path, slow: bool) -> None:
    threads = torch.get_num_threads()
    session = Session(tmp_path / "page")
    problems: list[str] = []
    try:
        with page_state():  # a page's plugin engines do not outlive it
            for block in WITH_BLOCKS[page]:
                if block.directives.skip or (block.directives.slow and not slow):
                    continue
                problems += check_block(session, block)
    finally:
        torch.set_num_threads(threads)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("page", RUNNABLE, ids=_ids(RUNNABLE))
def test_page_commands_print_what_the_page_shows(page: Path, tmp_path: Path) -> None:
    _run_page(page, tmp_path, slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", WITH_SLOW, ids=_ids(WITH_SLOW))
def test_page_commands_with_the_slow_ones(page: Path, tmp_path: Path) -> None:
    _run_page(page, tmp_path, slow=True)


def test_every_command_block_is_run_or_says_why_not() -> None:
    """A bash block is run, or its directive gives the reason it is not."""
    silent: list[Block] = [b for blocks in WITH_BLOCKS.values() for b in blocks if b.directives.skip == "skipped"]
    assert not silent, [b.where for b in silent]
    assert len(RUNNABLE) >= 10


def test_the_harness_compares_what_it_should() -> None:
    """Numbers within tolerance, durations free, '...' for lines and text; words exact."""
    from docs_harness import Directives, compare

    shown = ["engine: implicit  steps: 150  final upper loss: 0.250207  wall time: 9.0s", "...", "results in runs/x/result.json"]
    got = ["engine: implicit  steps: 150  final upper loss: 0.2502071  wall time: 31.2s", "  a: 1", "  b: 2",
           "results in runs/x/result.json"]
    assert compare(shown, got, Directives()) is None
    assert "0.26" in compare(shown, [got[0].replace("0.2502071", "0.26"), got[3]], Directives())
    assert compare(shown, [got[0].replace("implicit", "unrolled"), got[3]], Directives()) is not None
    assert compare(shown, got[:1], Directives()) is not None  # a missing line
    reduced = Directives(appends={"run": ["--set", "run.steps=2"]})
    assert compare(shown, [got[0].replace("150", "2").replace("0.2502071", "0.61"), got[3]], reduced) is None
    assert compare(["  x: 0.9360"], ["  x: 0.93601"], Directives()) is None
    assert compare(["  x: 0.9360"], ["  x: 0.9400"], Directives()) is not None
    assert compare(["{'time_s': 0.44...}"], ["{'time_s': 0.0312}"], Directives()) is None


def test_a_block_that_needs_a_missing_extra_is_not_run_and_plugins_do_not_outlive_their_page(tmp_path: Path) -> None:
    from docs_harness import parse_directives

    from bilevel.engines import engine_kinds

    needs = parse_directives(" needs: pandas, no_such_module_here; numbers: any ")
    assert needs.needs == ["pandas", "no_such_module_here"] and needs.numbers == "any"
    assert "no_such_module_here" in needs.missing() and "json" not in parse_directives("needs: json").missing()
    block = Block(ROOT / "README.md", 1, "bash", "exit 1\n", needs, expected=["never compared"])
    assert check_block(Session(tmp_path / "page"), block) == []  # not run: it would fail
    plugin = ROOT / "examples" / "new_engine" / "f2sa.py"
    before = engine_kinds()
    with page_state():
        Session(tmp_path / "page").run_command(f"bilevel engines --plugin {plugin}", parse_directives(""))
        assert "f2sa" in engine_kinds()
    assert engine_kinds() == before
