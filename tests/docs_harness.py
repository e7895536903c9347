"""Runs the commands shown in the documentation and compares what they print with the output
blocks shown beside them (tests/test_docs.py).

A page's fenced blocks are taken in order:

- a ``bash`` block is a list of commands (``\\`` continues a line, ``#`` starts a comment);
- a ``text`` block right after an executed block is that block's expected output (every
  command's standard output and error, in order; progress lines are never compared);
- a ``text`` block whose lines start with ``$ `` is a transcript: each ``$ `` line a command
  (``#`` starts a comment), the lines under it its output;
- a ``python`` block runs (in this process, in the page's directory; with ``outside`` as a script
  of its own in an empty directory) when an output block follows it or a directive says ``run``.

An HTML comment right before a block (invisible on the rendered page) steers it:

    <!-- doc-test: skip: why -->              not run (installation, GPUs, external data, hours)
    <!-- doc-test: slow -->                   run only with ``pytest -m slow``
    <!-- doc-test: run += --set run.steps=3 --> append to every ``bilevel run`` (likewise
                                                 ``sweep +=``, ``retrain +=``, ``hypergrad +=``)
    <!-- doc-test: replace: n_trials=30 => n_trials=2 -->   edit the commands (python blocks too)
    <!-- doc-test: numbers: any -->           compare the numbers' places, not their values
    <!-- doc-test: numbers: rel=0.05 -->      a looser relative tolerance
    <!-- doc-test: outside -->                run in an empty directory, outside the repository
    <!-- doc-test: run -->                    run a python block that shows no output
    <!-- doc-test: needs: pandas -->          not run where that optional extra is not installed

Directives combine with ``;``. Every page runs in its own scratch directory that holds links to
the repository's examples/, problems/, benchmarks/ and docs/ (so the relative paths of the
docs work, and runs write under it); ``bilevel`` commands run in this process (typer's test
runner: no start-up per command), anything else through bash, with this interpreter's
``bilevel`` first on PATH. Processes started so (bash commands, ``outside`` python blocks)
import this checkout's packages, the ones ``pip install .`` installs (bilevel and problems,
linked from a directory on their PYTHONPATH), whatever copy the interpreter may have installed;
nothing else of the repository is importable there. Engines a page's plugins register, and the
modules of user code they import, are forgotten after the page (``page_state``), as if each
page ran in a fresh process.

Comparison, line by line: a line ``...`` in the expected output stands for any number of lines;
``...`` inside a line for any text; a number matches a number, equal within max(2e-3 relative,
half a unit of its last printed digit) by default, any number where it is a duration (followed
by ``s``, or after ``time``, ``elapsed`` or ``wall``) or where the block is reduced
(``run +=``, ``numbers: any``); everything else (engine names, plan reasons, keys, file names)
must be equal. Run with ``python tests/docs_harness.py PAGE`` to print what each block prints now
(to refresh a page)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINKED = ("examples", "problems", "benchmarks", "docs")
INSTALLED = ("bilevel", "problems")
"""The repository's packages, what an installation of it can import (pyproject.toml)."""
DEFAULT_REL = 2e-3
TIMEOUT_S = 600

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
_DIRECTIVE = re.compile(r"<!--\s*doc-test:(.*?)-->", re.S)
_LAST_DIRECTIVE = re.compile(r"<!--\s*doc-test:(.*?)-->\s*$", re.S)
_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"
_PROGRESS = re.compile(r"^\S.*: step \d+/\d+  upper loss ")
_DURATION_BEFORE = re.compile(r"(time|elapsed|wall)[^\d-]{0,12}$", re.I)


@dataclass
class Directives:
    """What an HTML comment before a block says (module docstring)."""

    skip: str | None = None
    slow: bool = False
    run: bool = False
    outside: bool = False
    appends: dict[str, list[str]] = field(default_factory=dict)
    replaces: list[tuple[str, str]] = field(default_factory=list)
    numbers: str = "value"
    rel: float = DEFAULT_REL
    needs: list[str] = field(default_factory=list)

    def missing(self) -> list[str]:
        """The modules of ``needs`` that cannot be imported here (optional extras not installed)."""
        import importlib.util

        return [name for name in self.needs if importlib.util.find_spec(name) is None]

    @property
    def reduced(self) -> bool:
        return bool(self.appends) or self.numbers == "any"


def parse_directives(text: str) -> Directives:
    """The directives of one comment (module docstring); ``skip:`` takes the rest as its reason."""
    out = Directives()
    if text.strip().startswith("skip"):
        out.skip = text.strip().partition(":")[2].strip() or "skipped"
        return out
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        if part.startswith("skip"):
            out.skip = part.partition(":")[2].strip() or "skipped"
        elif part == "slow":
            out.slow = True
        elif part == "run":
            out.run = True
        elif part == "outside":
            out.outside = True
        elif "+=" in part:
            command, _, args = part.partition("+=")
            out.appends[command.strip()] = shlex.split(args)
        elif part.startswith("replace:"):
            old, _, new = part[len("replace:"):].partition("=>")
            out.replaces.append((old.strip(), new.strip()))
        elif part.startswith("needs:"):
            out.needs += part.partition(":")[2].replace(",", " ").split()
        elif part.startswith("numbers:"):
            value = part.partition(":")[2].strip()
            if value.startswith("rel="):
                out.rel = float(value[4:])
            else:
                out.numbers = value
        else:
            raise ValueError(f"unknown doc-test directive {part!r}")
    return out


@dataclass
class Block:
    """One fenced block of a page, with the directives before it and its expected output."""

    page: Path
    line: int
    lang: str
    body: str
    directives: Directives
    expected: list[str] | None = None
    transcript: list[tuple[str, list[str]]] | None = None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _transcript(body: str) -> list[tuple[str, list[str]]] | None:
    lines = body.rstrip("\n").splitlines()
    if not lines or not lines[0].startswith("$ "):
        return None
    steps: list[tuple[str, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def page_blocks(page: Path) -> list[Block]:
    """The blocks of ``page`` that the harness runs or compares, in order."""
    text = page.read_text()
    blocks: list[Block] = []
    previous_end = 0
    pending: Block | None = None
    for match in _FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        between = text[previous_end:match.start()]
        previous_end = match.end()
        found = _LAST_DIRECTIVE.search(between)  # a directive applies to the block right under it
        directives = parse_directives(found.group(1)) if found else Directives()
        line = text.count("\n", 0, match.start()) + 1
        only_space = not _DIRECTIVE.sub("", between).strip()
        if lang == "text":
            steps = _transcript(body)
            if steps is not None:
                blocks.append(Block(page, line, "transcript", body, directives, transcript=steps))
                pending = None
                continue
            if pending is not None and only_space:
                pending.expected = body.rstrip("\n").splitlines()
            pending = None
            continue
        if lang in ("bash", "python"):
            block = Block(page, line, lang, body, directives)
            blocks.append(block)
            pending = block
        else:
            pending = None
    return [b for b in blocks if b.lang != "python" or b.expected is not None or b.directives.run]


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def command_lines(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blanks dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    return [line for line in (_strip_comment(raw).strip() for raw in joined.splitlines()) if line]


# ---------------------------------------------------------------- running


class Session:
    """A page's scratch directory and how its commands run there."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for name in LINKED:
            link = directory / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        self.cwd = directory
        site = directory.parent / f"{directory.name}-site"  # what an installation of the checkout can import
        site.mkdir(parents=True, exist_ok=True)
        for name in INSTALLED:
            link = site / name
            if not link.exists():
                link.symlink_to(ROOT / name)
        bindir = str(Path(sys.executable).parent)
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "BILEVEL_THREADS")}
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        self.env["PYTHONPATH"] = str(site)
        self.env.pop("COLUMNS", None)

    def run_block(self, block: Block) -> list[str]:
        """Run a block; returns what it printed, as lines (progress lines left out)."""
        d = block.directives
        if block.lang == "python":
            return self._python(_edit(block.body, d), d)
        if block.lang == "transcript":
            out: list[str] = []
            for command, _ in block.transcript or []:
                out += self.run_command(_strip_comment(_edit(command, d, strict=False)), d, check=False)
            return out
        out = []
        for command in command_lines(_edit(block.body, d)):
            out += self.run_command(command, d)
        return out

    def run_command(self, command: str, d: Directives, check: bool = True) -> list[str]:
        """One command line: ``bilevel ...`` (with environment assignments before it, ``> FILE``
        after it, or ``; echo "exit code $?"``) in this process, ``cd DIR`` for the next
        commands, anything else through bash. ``check``: a non-zero exit status is an error
        (a transcript shows the errors it expects instead)."""
        shell_command = command
        head, sep, tail = command.partition(";")
        echo_status = bool(sep) and tail.strip() in ('echo "exit code $?"', "echo exit code $?")
        if echo_status:
            command = head
        words = shlex.split(command)
        env: dict[str, str] = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = os.path.expanduser(value)
        if words[:1] == ["cd"] and len(words) == 2:
            target = Path(os.path.expanduser(words[1]))
            self.cwd = target if target.is_absolute() else self.cwd / target
            return []
        redirect = None
        if ">" in words and words.index(">") == len(words) - 2:
            redirect, words = words[-1], words[:-2]
        operators = {"|", ";", "&&", "||", ">", ">>", "<", "2>&1"}
        if words[:1] != ["bilevel"] or operators & set(words) or (sep and not echo_status):
            return self._bash(shell_command, env, check)
        args = words[1:]
        if args and args[0] in d.appends:
            args = args + d.appends[args[0]]
        code, text = self._bilevel(args, env, redirect)
        lines = text.splitlines()
        if echo_status:
            lines.append(f"exit code {code}")
        elif code != 0 and check:
            raise AssertionError(f"`{command}` exited with {code}:\n{text}")
        return lines

    def _bilevel(self, args: list[str], env: dict[str, str], redirect: str | None) -> tuple[int, str]:
        import torch
        from typer.testing import CliRunner

        from bilevel.cli import app

        threads = torch.get_num_threads()
        full_env = {k: v for k, v in self.env.items() if k != "PATH"}
        unset = {k: None for k in ("OMP_NUM_THREADS", "BILEVEL_THREADS", "MKL_NUM_THREADS") if k not in env}
        with _chdir(self.cwd):
            result = CliRunner().invoke(app, args, env={**full_env, **unset, **env}, catch_exceptions=True)
        torch.set_num_threads(threads)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"bilevel {shlex.join(args)} raised {result.exception!r}:\n{result.output}")
        if redirect is not None:
            (self.cwd / redirect).write_text(result.stdout)
            text = result.stderr
        else:
            text = result.output
        return result.exit_code, "\n".join(line for line in text.splitlines() if not _PROGRESS.match(line))

    def _bash(self, command: str, env: dict[str, str], check: bool = True) -> list[str]:
        done = subprocess.run(["bash", "-c", command], cwd=self.cwd, env={**self.env, **env}, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        if done.returncode != 0 and check:
            raise AssertionError(f"`{command}` exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return [line for line in (done.stdout + done.stderr).splitlines() if not _PROGRESS.match(line)]

    def _python(self, source: str, d: Directives) -> list[str]:
        """A python block: in this process, in the page's directory (no start-up to pay); with
        ``outside``, as a script of its own in an empty directory, where only what is installed
        can be imported (not the repository's benchmarks/ or tests/)."""
        if not d.outside:
            import io

            import torch

            threads, printed = torch.get_num_threads(), io.StringIO()
            with _chdir(self.cwd), contextlib.redirect_stdout(printed):
                exec(compile(source, "<doc block>", "exec"), {"__name__": "__doc_block__"})
            torch.set_num_threads(threads)
            return printed.getvalue().splitlines()
        cwd = self.directory.parent / (self.directory.name + "-outside")
        cwd.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-c", source], cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise AssertionError(f"the python block exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout.splitlines()


@contextlib.contextmanager
def page_state():
    """Run a page as if in a fresh process: the engines its plugins register are unregistered
    afterwards, and the modules of user code it imported (``bilevel_user_*``) forgotten, so
    that no page's output depends on the pages run before it in this process."""
    from bilevel.engines.registry import engine_kinds, unregister

    kinds, modules = set(engine_kinds()), set(sys.modules)
    try:
        yield
    finally:
        for kind in set(engine_kinds()) - kinds:
            unregister(kind)
        for name in set(sys.modules) - modules:
            if name.startswith("bilevel_user_"):
                del sys.modules[name]


@contextlib.contextmanager
def _chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _edit(text: str, d: Directives, strict: bool = True) -> str:
    """``text`` with the block's replacements made; ``strict``: each must find its text (a
    transcript's commands are edited one by one, and check_block checks the whole block)."""
    for old, new in d.replaces:
        if strict and old not in text:
            raise AssertionError(f"replace: {old!r} is not in the block")
        text = text.replace(old, new)
    return text


# ---------------------------------------------------------------- comparing


def _line_pattern(expected: str) -> tuple[re.Pattern[str], list[tuple[str, bool]]]:
    """A regex for one expected line and, per number in it, (its text, whether it is a duration)."""
    pattern, numbers, position = "", [], 0
    token = re.compile(r"\.\.\.|" + _NUMBER)
    for match in token.finditer(expected):
        start, end = match.span()
        # a number glued to a word (x1, c_{k-2}, sha256) is text, not a number
        if match.group() != "..." and start > 0 and (expected[start - 1].isalpha() or expected[start - 1] == "_"):
            continue
        pattern += re.escape(expected[position:start])
        if match.group() == "...":
            pattern += ".*?"
        else:
            pattern += f"({_NUMBER}|nan|inf)"
            after = expected[end:end + 1]
            duration = after == "s" or bool(_DURATION_BEFORE.search(expected[:start]))
            numbers.append((match.group(), duration))
        position = end
    pattern += re.escape(expected[position:])
    return re.compile(pattern), numbers


def _close(expected: str, actual: str, rel: float) -> bool:
    try:
        e, a = float(expected), float(actual)
    except ValueError:
        return expected == actual
    digits = expected.lower().split("e")[0]
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    exponent = int(expected.lower().split("e")[1]) if "e" in expected.lower() else 0
    half_unit = 0.5 * 10.0 ** (exponent - decimals)
    return abs(a - e) <= max(rel * abs(e), half_unit)


def line_matches(expected: str, actual: str, d: Directives) -> str | None:
    """None when ``actual`` matches ``expected``, else why not."""
    pattern, numbers = _line_pattern(expected)
    match = pattern.fullmatch(actual)
    if match is None:
        return "the text differs"
    if d.reduced:
        return None
    for (shown, duration), got in zip(numbers, match.groups()):
        if not duration and not _close(shown, got, d.rel):
            return f"{got} is not {shown} (relative tolerance {d.rel})"
    return None


def compare(expected: list[str], actual: list[str], d: Directives) -> str | None:
    """None when the output matches the expected lines (module docstring), else a report."""
    expected = [line.rstrip() for line in expected]
    actual = [line.rstrip() for line in actual]
    while actual and not actual[-1]:
        actual.pop()
    failures: list[str] = []

    def walk(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual)
        if expected[i].strip() == "...":
            return any(walk(i + 1, k) for k in range(j, len(actual) + 1))
        if j == len(actual):
            failures.append(f"expected line {i + 1} {expected[i]!r}: the output ended")
            return False
        why = line_matches(expected[i], actual[j], d)
        if why is not None:
            failures.append(f"expected line {i + 1}:\n    {expected[i]}\n  got:\n    {actual[j]}\n  ({why})")
            return False
        return walk(i + 1, j + 1)

    if walk(0, 0):
        return None
    shown = "\n".join(f"    {line}" for line in actual)
    return f"{failures[-1] if failures else 'no match'}\n  whole output:\n{shown}"


def check_block(session: Session, block: Block) -> list[str]:
    """Run ``block`` and compare; returns the problems found (empty: it matches). A block that
    needs an optional extra that is not installed is not run."""
    problems: list[str] = []
    if block.directives.missing():
        return problems
    if block.transcript is not None:
        _edit(block.body, block.directives)  # every replacement finds its text somewhere in the block
        for command, expected in block.transcript:
            actual = session.run_command(_strip_comment(_edit(command, block.directives, strict=False)), block.directives,
                                         check=False)
            why = compare(expected, actual, block.directives) if expected else None
            if why is not None:
                problems.append(f"{block.where}: `$ {command}`: {why}")
        return problems
    actual = session.run_block(block)
    if block.expected is not None:
        why = compare(block.expected, actual, block.directives)
        if why is not None:
            problems.append(f"{block.where}: {why}")
    return problems


def main() -> None:
    """Print what each block of the pages given prints now (``--slow`` runs the slow ones too)."""
    import tempfile

    slow = "--slow" in sys.argv
    for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
        page = (ROOT / name).resolve()
        with tempfile.TemporaryDirectory() as scratch, page_state():
            session = Session(Path(scratch) / "page")
            for block in page_blocks(page):
                if block.directives.skip or (block.directives.slow and not slow) or block.directives.missing():
                    reason = block.directives.skip or ("slow" if block.directives.slow and not slow else None)
                    print(f"## {block.where}: not run ({reason or 'needs ' + ', '.join(block.directives.missing())})")
                    continue
                print(f"## {block.where} ({block.lang})")
                if block.transcript is not None:
                    for command, _ in block.transcript:
                        print(f"$ {command}")
                        print("\n".join(session.run_command(_strip_comment(_edit(command, block.directives, strict=False)),
                                                             block.directives, check=False)))
                else:
                    print("\n".join(session.run_block(block)))


if __name__ == "__main__":
    main()
