"""The one exception type the model-preparation tools raise for expected failures.

Why a shared base: ``python -m quantize`` turns these into a single ``error:`` line
and exit code 1, while anything else (a bug) keeps its traceback. Each tool module
subclasses it, so the CLI needs to know only this one class.
"""

from __future__ import annotations


class ToolError(RuntimeError):
    """An expected, user-facing failure; the message is one line that says what to do."""
