"""Every fenced ```python block in README.md and docs/*.md runs as written.

The blocks of one file run in order in one namespace, in a fresh Python
process (a set-up block right above a block counts), with the repository on
the path and a temporary folder as the working directory. A block whose fence
has on the line before it

    <!-- fragment: PATH -->

is not run: it is a piece of a larger program, and PATH (relative to the
repository root) is the file that holds the complete, tested version; the test
checks that PATH exists. A failing block's traceback names the Markdown file
and the line in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
FRAGMENT = re.compile(r"^\s*<!--\s*fragment:\s*(\S+)\s*-->\s*$")
TIMEOUT_S = 300  # one file's blocks together


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # the line of the first line of code (1-based)
    code: str
    fragment: str | None  # PATH of the complete version, or None


def blocks(path: Path) -> list[Block]:
    """The fenced Python blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.name}:{i + 1}: the fence {fence} is never closed")
        if language in ("python", "py"):
            marker = FRAGMENT.match(lines[i - 1]) if i > 0 else None
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            found.append(Block(path, i + 2, code, marker.group(1) if marker else None))
        i = end + 1
    return found


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


ALL = [block for path in DOCS for block in blocks(path)]
FRAGMENTS = [block for block in ALL if block.fragment]
RUNNABLE = [path for path in DOCS if any(not b.fragment for b in blocks(path))]

# Runs the blocks given as JSON on stdin. Each block is compiled with the
# Markdown file as its file name and padded so that line numbers match it.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for name, line, code in json.load(sys.stdin):
    print(f"== {name}:{line}", flush=True)
    exec(compile("\\n" * (line - 1) + code, name, "exec"), namespace)
"""


def run_blocks(found: list[Block], cwd: Path, timeout: float = TIMEOUT_S):
    """Runs the blocks that are not fragments, in order, in one fresh process."""
    todo = [(_name(b.path), b.line, b.code) for b in found if not b.fragment]
    env = dict(os.environ, MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", RUNNER],
        input=json.dumps(todo),
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("path", RUNNABLE, ids=_name)
def test_blocks_run(path: Path, tmp_path: Path) -> None:
    result = run_blocks(blocks(path), tmp_path)
    if result.returncode != 0:
        pytest.fail(
            f"a Python block of {_name(path)} failed (the last '== FILE:LINE' is the block):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}",
            pytrace=False,
        )


@pytest.mark.parametrize("block", FRAGMENTS, ids=lambda b: f"{_name(b.path)}:{b.line}")
def test_fragment_names_a_file(block: Block) -> None:
    assert not Path(block.fragment).is_absolute() and (ROOT / block.fragment).is_file(), (
        f"{_name(block.path)}:{block.line}: the fragment's complete version "
        f"{block.fragment!r} is not a file of the repository (a path from its root)"
    )


@pytest.mark.parametrize("path", DOCS, ids=_name)
def test_every_fragment_marker_sits_on_a_python_fence(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("<!--") and "fragment:" in line:
            fence = FENCE.match(lines[number]) if number < len(lines) else None
            assert FRAGMENT.match(line) and fence and fence.group(3) in ("python", "py"), (
                f"{_name(path)}:{number}: {line.strip()!r} must be written "
                "'<!-- fragment: PATH -->' on the line right above a ```python fence"
            )


def test_the_collector_finds_blocks_and_fragments(tmp_path: Path) -> None:
    """The collector against a hand-written page: a fragment is skipped, the
    rest run in order in one namespace, and a failing block fails the run."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n"
        "```python\n"
        "a = 1\n"
        "```\n"
        "<!-- fragment: tests/test_docs.py -->\n"
        "```python\n"
        "undefined_name\n"
        "```\n"
        "```bash\n"
        "exit 1\n"
        "```\n"
        "```python\n"
        "assert a == 1\n"
        "b = a + 1\n"
        "```\n"
    )
    found = blocks(page)
    assert [(b.line, b.code, b.fragment) for b in found] == [
        (3, "a = 1", None),
        (7, "undefined_name", "tests/test_docs.py"),
        (13, "assert a == 1\nb = a + 1", None),
    ]
    assert run_blocks(found, tmp_path, timeout=60).returncode == 0

    page.write_text(page.read_text().replace("assert a == 1", "assert a == 2"))
    failed = run_blocks(blocks(page), tmp_path, timeout=60)
    assert failed.returncode != 0
    assert 'page.md", line 13' in failed.stderr

