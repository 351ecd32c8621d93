"""CI must run exactly the commands the README gives a new user."""

import re

from conftest import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```\n(.*?)\n```", text, flags=re.S)
    return [b for b in blocks if "pip install" in b][:2]


def test_ci_runs_the_readme_commands_verbatim():
    commands = readme_commands()
    assert len(commands) == 2, "README must start with an install+demo and an install+test command"
    assert "posedata build" in commands[0] and "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    for command in commands:
        assert command in ci
