"""``recsys bench scale``: cost versus size on synthetic data (issue 17; being built)."""

from __future__ import annotations

import argparse


def register(groups: dict[str, argparse._SubParsersAction]) -> None:
    """Nothing registered yet."""
