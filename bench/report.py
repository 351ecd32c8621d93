"""What every benchmark records about its run and how it writes it: the commit it ran at,
and the result as JSON beside a Markdown table (printed too), so the figures quoted in
bench/README.md can be traced to a file and a command."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def git_commit() -> str | None:
    """The checkout's short HEAD, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_report(out: str | Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> str:
    """`result` to OUT (JSON) and its table to OUT with .md; prints the table and returns it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    print()
    print(table)
    return table


def render_earlier(path: str | Path, markdown: Callable[[dict[str, Any]], str]) -> None:
    """`--render JSON`: the table of an earlier run's JSON, printed and written beside it."""
    table = markdown(json.loads(Path(path).read_text()))
    Path(path).with_suffix(".md").write_text(table)
    print(table)
