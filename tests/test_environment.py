"""environment.yml (conda users) must list the same packages and pins as pyproject.toml."""
from __future__ import annotations

import re
import tomllib

from conftest import REPO


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*(==\s*[^\s;#]+)?\s*", line)
        assert m, f"unparseable requirement {line!r}"
        out[m.group(1).lower().replace("_", "-")] = (m.group(2) or "").replace(" ", "")
    return out


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env_lines = (REPO / "environment.yml").read_text().splitlines()
    start = next(i for i, l in enumerate(env_lines) if l.strip() == "- pip:")
    pip_lines = [l.strip()[2:] for l in env_lines[start + 1:] if l.strip().startswith("- ")]
    conda = _pins(pip_lines)
    assert conda == declared
    assert any(l.strip() == "- python=3.11" for l in env_lines)
    assert all(v.startswith("==") for v in declared.values()), "every dependency is pinned"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and re.search(r"^make test$", ci, re.M)
    assert "make main" in readme
