"""Progress bars (fer_lib.utils.progress_bar): on in JupyterLab and on a terminal, off in logs, redirected
output and the notebooks the pipeline executes (FER_LIB_PROGRESS=0)."""
from __future__ import annotations

import io
import re

import pytest

from fer_lib.utils import PROGRESS_ENV, REPO_ROOT, progress_bar, progress_wanted


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch: pytest.MonkeyPatch) -> _Terminal:
    """stderr becomes a terminal and FER_LIB_PROGRESS is unset (in the test's body: pytest's output
    capture puts its own stderr back between a fixture and the test)."""
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    stream = _Terminal()
    monkeypatch.setattr("sys.stderr", stream)
    return stream


def test_bars_show_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    assert progress_wanted()
    bar = progress_bar(range(3), desc="loop")
    assert not bar.disable and list(bar) == [0, 1, 2]
    bar.close()
    assert "loop" in terminal.getvalue() and "3/3" in terminal.getvalue()


def test_bars_are_off_with_the_variable_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    monkeypatch.setenv(PROGRESS_ENV, "0")
    bar = progress_bar(range(3), desc="loop")
    assert bar.disable and list(bar) == [0, 1, 2]
    bar.update(1)
    bar.set_postfix(loss=1.0)     # a silent bar still takes every call a loop makes
    bar.close()
    assert terminal.getvalue() == ""


def test_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    log = io.StringIO()               # a log file, a pipe, CI
    monkeypatch.setattr("sys.stderr", log)
    assert not progress_wanted()
    bar = progress_bar(total=5)
    assert bar.disable
    bar.update(5)
    bar.close()
    assert log.getvalue() == ""


def test_the_variable_forces_bars_on_but_a_call_may_still_disable_its_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "1")
    out = io.StringIO()
    bar = progress_bar(range(2), file=out)
    assert not bar.disable and list(bar) == [0, 1]
    bar.close()
    assert "2/2" in out.getvalue()
    assert progress_bar(range(2), disable=True, file=out).disable   # e.g. `disable=not progress`


def test_library_loops_go_through_the_helper() -> None:
    """No fer_lib module builds tqdm.auto bars of its own (they would bypass FER_LIB_PROGRESS)."""
    pattern = re.compile(r"^\s*(from tqdm\.(auto|autonotebook|notebook) import|import tqdm\.(auto|notebook))", re.M)
    offenders = [str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "fer_lib").rglob("*.py"))
                 if p.name != "utils.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
