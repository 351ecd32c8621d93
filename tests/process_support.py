"""Processes of one process session, for tests that start Ray or builds in their own session
(`start_new_session=True`) and must stop exactly those processes: read from /proc, so a
forked Ray worker or agent is found even after its parent has died."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live processes in process session `sid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(entry), name))
    return found


def signal_session(sid: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` to every live process of session `sid` (gone ones are skipped)."""
    for pid, _ in session_processes(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
