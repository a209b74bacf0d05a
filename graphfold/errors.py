"""Errors that reach the user as one line and an exit code."""
from __future__ import annotations


class GraphfoldError(Exception):
    """Base of graphfold's user-facing errors; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UsageError(GraphfoldError):
    """Bad arguments or an input file graphfold cannot use (exit 2)."""


class ValidationError(GraphfoldError):
    """The optimized model does not match the original (exit 1); nothing is written."""

    exit_code = 1


def first_line(exc: BaseException, fallback: str | None = None) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line errors;
    ``fallback`` (the exception's type name by default) when the message is empty. A first line
    ending in ':' is a sentence that goes on (onnx's checker: "... input 'a' of node:\nname: ..."),
    so the lines are joined."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if fallback is None else fallback
    lines = text.splitlines()
    if lines[0].rstrip().endswith(":"):
        return " ".join(" ".join(lines).split())[:300]
    return lines[0][:300]
