"""The README's promises: the CI runs its test command, the package exports what it documents."""

from __future__ import annotations

import re

import sudo_queue

from .helpers import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", quickstart)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run contains the README's test command verbatim, so the two cannot drift apart."""
    commands = readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "sudo-queue demo" in demo
    assert tests.endswith("pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


def test_all_is_sorted_and_complete() -> None:
    """`sudo_queue.__all__` is sorted and names only things the package defines."""
    assert sudo_queue.__all__ == sorted(sudo_queue.__all__)
    for name in sudo_queue.__all__:
        assert hasattr(sudo_queue, name), name
    public = {n for n in dir(sudo_queue) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(sudo_queue.__all__), public - set(sudo_queue.__all__)


def test_import_stays_light() -> None:
    """`import sudo_queue` loads neither arq's worker nor slack_bolt."""
    import subprocess
    import sys

    code = (
        "import sys, sudo_queue; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('arq', 'slack_bolt')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
