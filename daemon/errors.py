"""Errors shared across the command-line layers (one class, whichever module ``python -m`` runs as main)."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """Bad arguments, input or configuration: exit code 2, with the message."""
