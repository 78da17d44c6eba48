"""Which code made a row, and rows kept in the suite's order: shared by the pages that merge runs
(benchmark.py, families.py). No TensorFlow here: families.py's parent process runs Keras 3."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str | None:
    """The checkout's short commit, or None where git is missing or this is not a checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def in_order(rows: list[dict], key: str, order: list[str]) -> list[dict]:
    """`rows` sorted by where `row[key]` sits in `order`; names not in it go last, in their order."""
    return sorted(rows, key=lambda r: order.index(r[key]) if r[key] in order else len(order))
