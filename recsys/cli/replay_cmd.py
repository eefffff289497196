"""``recsys replay``: placeholder while the command is being built (registers nothing yet)."""

from __future__ import annotations

import argparse


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Nothing registered yet."""
