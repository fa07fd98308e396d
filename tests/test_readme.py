"""Every ```python block of README.md runs, on the CPU, each in a fresh namespace.

A block opts out with a first line ``# not run: <reason>`` (GPU-only or very slow
examples); it is then reported as skipped with that reason. A first line ``# needs: PKG``
skips the block where the optional package PKG is not installed. Blocks are executed in
this process with empty dynamo caches (as if each were a fresh script: no dynamic-shape
recompiles, no recompile limit carried over), in a temporary working directory,
with flexna's EagerFallbackWarning allowed (CPU examples that need gradients use the
dense fallback, which is what a user sees too). Tracebacks point at README.md lines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
OPT_OUT = "# not run:"
NEEDS = "# needs:"  # "# needs: diffusers": skipped where that optional package is not installed

# Blocks in README sections owned elsewhere that are known to fail, keyed by their first
# line: a strict xfail, so the test fails (XPASS) as soon as the block is fixed and the
# entry must be removed.
KNOWN_FAILING: dict[str, str] = {}


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """``(heading, first code line number, code)`` of every fenced python block."""
    blocks, heading, lines = [], "(top)", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start = i + 1
            end = start
            while lines[end].strip() != "```":
                end += 1
            blocks.append((heading, start + 1, "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def block_id(block: tuple[str, int, str]) -> str:
    heading, line, _ = block
    return f"L{line}-" + re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]


def params():
    out = []
    for block in BLOCKS:
        first = block[2].splitlines()[0].strip()
        marks = []
        if first in KNOWN_FAILING:
            marks.append(pytest.mark.xfail(reason=KNOWN_FAILING[first], strict=True))
        out.append(pytest.param(block, id=block_id(block), marks=marks))
    return out


def test_readme_has_blocks():
    assert len(BLOCKS) >= 8


def test_every_extension_section_has_a_runnable_example():
    """Each ### section under "## Extensions" holds at least one python block that runs."""
    text = README.read_text()
    ext = text[text.index("## Extensions"):]
    ext = ext[:ext.index("\n## ", 1)]
    sections = re.split(r"\n(?=### )", ext)[1:]
    assert len(sections) >= 7
    for sec in sections:
        title = sec.splitlines()[0]
        runnable = [code for _, _, code in python_blocks(sec) if not code.startswith(OPT_OUT)]
        assert runnable, f"README section {title!r} has no runnable python example"


@pytest.mark.filterwarnings("ignore::flexna.errors.EagerFallbackWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("block", params())
def test_readme_block(block, tmp_path, monkeypatch):
    heading, line, code = block
    first = code.splitlines()[0].strip()
    if first.startswith(OPT_OUT):
        pytest.skip(f"README.md:{line} ({heading}): {first[len(OPT_OUT):].strip()}")
    if first.startswith(NEEDS):
        for package in first[len(NEEDS):].split(","):
            pytest.importorskip(package.strip())
    monkeypatch.chdir(tmp_path)
    torch.compiler.reset()
    try:
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "__readme__"})
    finally:
        torch.compiler.reset()
