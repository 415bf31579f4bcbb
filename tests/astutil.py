"""Parsing the project's own source in tests that check its structure."""
from __future__ import annotations

import ast
from pathlib import Path


def parse_python(path: Path, attempts: int = 5) -> ast.Module:
    """`ast.parse` of a file, retried on CPython 3.11's spurious `SystemError` ("AST
    constructor recursion depth mismatch"): the interpreter keeps that depth per process,
    so a parse on another thread at the same moment (a background server compiling a chat
    template, say) can trip it. The error says nothing about the file."""
    source = path.read_text(encoding="utf-8")
    for attempt in range(attempts):
        try:
            return ast.parse(source, filename=str(path))
        except SystemError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
