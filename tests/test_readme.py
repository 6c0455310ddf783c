"""The README is the entry point: its test command is what CI runs, its links resolve, it stays short."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for block in _bash_blocks(README) for line in block.splitlines()
                if "pytest" in line]
    assert len(commands) == 1, commands
    assert commands[0] in ci.splitlines()


def test_readme_has_one_install_and_run_command():
    setup = [line for block in _bash_blocks(README) for line in block.splitlines()
             if line.startswith("python3 -m venv")]
    assert len(setup) == 2, setup
    assert any(line.endswith("qdcompile demo") for line in setup), setup


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 120
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links, "the README links to docs/"
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"
    for name in re.findall(r"`((?:quality|sm90|mixed|correction|replicates)[\w.-]*\.md)`", README):
        assert (ROOT / "bench" / "results" / name).exists(), f"README cites bench/results/{name}"
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / link).exists(), f"{doc.name} links to {link}, which does not exist"
