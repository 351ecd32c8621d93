"""The one base class of the problems a user can fix: a bad option, a bad input folder, a
dataset that is damaged or not there. Its message is one line that names the file or option
and says what to do; the CLI prints it as `Error: ...` and exits 1. Any other exception is a
bug in posedata and keeps its traceback."""

from __future__ import annotations


class PosedataError(Exception):
    """A user-fixable problem; str(error) is the one-line message shown to the user."""
