"""`unlearnd run`, `broker`, `publish`, `receipts`, `config`, `audit` (placeholder until the daemon lands)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type
    """Register this layer's subcommands on the top-level parser."""
