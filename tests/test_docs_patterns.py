"""Every ```python block of docs/patterns.md runs on the CPU, each in a fresh namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_readme import block_id, python_blocks

DOC = Path(__file__).resolve().parent.parent / "docs" / "patterns.md"
BLOCKS = python_blocks(DOC.read_text())


def test_patterns_doc_has_blocks() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", [pytest.param(b, id=block_id(b)) for b in BLOCKS])
def test_patterns_doc_block(block, tmp_path, monkeypatch) -> None:
    _, line, code = block
    monkeypatch.chdir(tmp_path)
    exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), {"__name__": "__doc_patterns__"})
