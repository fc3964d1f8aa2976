"""JupyterLab and the rendered results, used the way a person uses them: in a real browser.

Starts JupyterLab headless on a free loopback port with a token and the project kernel,
drives Debian's Chromium through the Chrome DevTools Protocol (a small client on
`websocket-client`, which jupyter already depends on: no Selenium/Playwright, no browser
download), opens notebook 01, runs all cells from the Run menu, waits for the kernel,
checks that no cell failed and that the heatmap figures are displayed, saves from the
browser and checks the saved notebook, and takes screenshots (the test's tmp dir; with FER_SAVE_SCREENSHOTS=1 also the
committed copy under results/screenshots/). Then it opens a results/index.html built by
fer_lib.workflow.pipeline from that executed notebook and checks its headline table and links.

Chromium comes from tests/browser_setup.sh (apt-get install chromium chromium-driver, as root);
the test skips, saying why, only where it cannot be installed.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import nbformat
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

NOTEBOOK = "01_au_heatmaps.ipynb"
SCREENSHOTS = REPO / "results" / "screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--no-default-browser-check", "--disable-extensions", "--window-size=1440,1000",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
LAB_SETTINGS = {   # JupyterLab user settings for the test: no network calls, every cell in the DOM
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                         "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


# --------------------------------------------------------------------------- processes
def _children(pid: int) -> list[int]:
    """Direct child process ids of `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _stop_group(proc: subprocess.Popen, extra_pids: list[int] = ()) -> None:
    """Terminate a process we started in its own session (its group), then any listed pids; by id."""
    pids = [proc.pid, *extra_pids]
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        for pid in extra_pids:
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)
        if not _wait_gone(pids, wait):
            return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Poll `check` until it returns a truthy value; fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- Chromium via CDP
def find_chromium() -> str | None:
    """Path of Debian's Chromium if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium() -> str:
    """Chromium's path, installing it with tests/browser_setup.sh when missing; pytest.skip with the reason otherwise."""
    path = find_chromium()
    if path:
        return path
    proc = subprocess.run(["bash", str(REPO / "tests" / "browser_setup.sh")], capture_output=True, text=True,
                          timeout=900)
    path = find_chromium()
    if proc.returncode != 0 or not path:
        pytest.skip(f"Chromium is not installed and could not be installed: "
                    f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return path


class CDP:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str, timeout: float = 60.0):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, **params: Any) -> dict:
        """Call a CDP method and return its result (raising on a protocol error)."""
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method} failed: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited) and return its JSON value."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str, settle: float = 0.0) -> str | None:
        """Open `url`; returns the navigation error text (None when it loaded)."""
        res = self.send("Page.navigate", url=url)
        if res.get("errorText"):
            return res["errorText"]
        _wait_for(lambda: self.js("document.readyState") == "complete", 60, f"{url} to load")
        time.sleep(settle)
        return None

    def click(self, x: float, y: float) -> None:
        """A real left click (mouse move, press, release) at page coordinates."""
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_text(self, selector: str, text: str, timeout: float = 30) -> None:
        """Click the centre of the first visible element matching `selector` whose text is `text`."""
        find = f"""(() => {{
            const el = [...document.querySelectorAll({json.dumps(selector)})]
                .find(e => e.textContent.trim() === {json.dumps(text)} && e.getClientRects().length);
            if (!el) return null;
            const r = el.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2];
        }})()"""
        x, y = _wait_for(lambda: self.js(find), timeout, f"a {selector!r} element reading {text!r}")
        self.click(x, y)

    def key(self, key: str, code: str, keycode: int, modifiers: int = 0) -> None:
        """Press and release one key (modifiers: 2 = Ctrl)."""
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, modifiers=modifiers,
                      windowsVirtualKeyCode=keycode, nativeVirtualKeyCode=keycode)

    def screenshot(self, path: Path) -> Path:
        """PNG of the viewport."""
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


@contextlib.contextmanager
def chromium_session(chromium: str, profile: Path) -> Iterator[CDP]:
    """Headless Chromium with a fresh profile; yields a CDP client on its page; leaves no process behind."""
    profile.mkdir(parents=True, exist_ok=True)
    log = open(profile.parent / "chromium.log", "wb")
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"
        _wait_for(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None, 60,
                  "Chromium's DevTools port")
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium exited with {proc.returncode}: "
                               f"{(profile.parent / 'chromium.log').read_text(errors='replace')[-1500:]}")
        port = int(port_file.read_text().split()[0])
        pages = _wait_for(lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=10).read()) if t["type"] == "page"], 30, "a page target")
        cdp = CDP(pages[0]["webSocketDebuggerUrl"])
        cdp.send("Page.enable")
        cdp.send("Runtime.enable")
        yield cdp
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                cdp.send("Browser.close")
            cdp.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        _stop_group(proc)
        log.close()


# --------------------------------------------------------------------------- JupyterLab
class Lab:
    """A running JupyterLab server (loopback, token) on a copy of the notebooks."""

    def __init__(self, root: Path, port: int, token: str, proc: subprocess.Popen, log: Path):
        self.root, self.port, self.token, self.proc, self.log = root, port, token, proc, log

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=20) as resp:
            body = resp.read()
        return json.loads(body) if body else None


@contextlib.contextmanager
def jupyterlab(root: Path, home: Path) -> Iterator[Lab]:
    """`python -m fer_lib.workflow.jupyter lab`'s command, headless, on 127.0.0.1:<free port> with a random token.

    Config, runtime, settings and workspace folders live under `home` (nothing of the user's is read
    or written). On exit: /api/shutdown (the server stops its kernels), then the server's process
    group and any kernel it started are terminated by id.
    """
    from fer_lib.workflow import jupyter

    jupyter.ensure_kernel()
    for name, value in LAB_SETTINGS.items():
        path = home / "settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"), "PYTHONUNBUFFERED": "1"}
    env.pop("MPLBACKEND", None)   # the notebook's inline backend, as in a normal session
    cmd = jupyter.lab_command(root, port=port, open_browser=False, extra=[
        f"--IdentityProvider.token={token}", f"--LabApp.user_settings_dir={home / 'settings'}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}", "--ServerApp.port_retries=0",
        "--ServerApp.terminals_enabled=False",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
    log_path = home / "jupyterlab.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(root, port, token, proc, log_path)
    kernels: list[int] = []
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}: "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            try:
                return lab.api("status") is not None
            except (urllib.error.URLError, ConnectionError, OSError):
                return False
        _wait_for(ready, 120, "JupyterLab to answer on its port")
        yield lab
    finally:
        kernels = [p for p in _children(proc.pid) if p != proc.pid]
        with contextlib.suppress(Exception):
            lab.api("shutdown", method="POST")
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        _stop_group(proc, _wait_gone(kernels, 10))
        log.close()
        left = [p for p in [proc.pid, *kernels] if _alive(p)]
        assert not left, f"processes left behind: {left}"


# --------------------------------------------------------------------------- the notebook page
NOTEBOOK_STATE = """(() => {
  const cells = [...document.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')];
  const prompts = cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
  const outputs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')];
  const errors = outputs.filter(o => o.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr'
                                     && /Traceback|Error\\b/.test(o.textContent)).map(o => o.textContent.slice(0, 300));
  const imgs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img')];
  const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return {n_cells: cells.length, prompts, errors,
          images: imgs.map(i => ({w: i.naturalWidth, h: i.naturalHeight, done: i.complete})),
          kernel_name: ((document.querySelector('.jp-Toolbar-kernelName') || {}).textContent || '').trim(),
          busy: status ? status.getAttribute('data-status') : null,
          dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 200))};
})()"""


def _executed(state: dict) -> bool:
    return bool(state["n_cells"]) and all(p.strip().startswith("[") and p.strip()[1:-2].strip().isdigit()
                                          for p in state["prompts"])


def _build_results(root: Path, executed_notebook: Path, metrics: Path) -> Path:
    """A results/ tree built by fer_lib.workflow.pipeline: the executed notebook 01 as a run, plus a headline pair."""
    from fer_lib.workflow import pipeline

    exp = root / "demo"
    runs = {
        ("heatmaps", "astronaut-1a2b3c"): (executed_notebook, None),
        ("train", "baseline-aaaaaa"): (None, {"au_weight": 0, "acc": 0.801, "att": 0.312}),
        ("train", "guided-bbbbbb"): (None, {"au_weight": 9, "acc": 0.823, "att": 0.861}),
    }
    for (stage, run), (notebook, fake) in runs.items():
        folder = exp / stage / run
        folder.mkdir(parents=True)
        if notebook is not None:
            shutil.copy(notebook, folder / NOTEBOOK)
            shutil.copy(metrics, folder / "metrics.json")
            nb_name = f"notebooks/{NOTEBOOK}"
        else:
            nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(f"# training run {run}")])
            nbformat.write(nb, folder / "02_train.ipynb")
            (folder / "metrics.json").write_text(json.dumps({
                "run": {"git_revision": "abc1234"},
                "config": {"backbone": "resnet18", "au_weight": fake["au_weight"], "layers": ["last"], "seed": 0},
                "test": {"accuracy": fake["acc"], "macro_f1": fake["acc"] - 0.05, "att_cos": {"layer4": fake["att"]},
                         "att_cos_mean": fake["att"], "cam_cos": {"cam": fake["att"] - 0.2}, "n": 70},
                "train_time_s": 12.0}))
            nb_name = "notebooks/02_train.ipynb"
        (folder / "run.json").write_text(json.dumps({"status": "ok", "notebook": nb_name, "git_revision": "abc1234",
                                                     "duration_s": 3.0}))
    (exp / "experiment.json").write_text(json.dumps({
        "name": "demo", "description": "browser test experiment", "source": "experiments/demo.toml", "seed": 0,
        "stages": [{"name": "heatmaps", "output": "heatmaps"}, {"name": "train", "output": "train"}],
        "headline": {"baseline": "train/baseline-aaaaaa", "guided": "train/guided-bbbbbb"}}))
    pipeline.render_notebooks(exp, verbose=False)
    index, _ = pipeline.write_index(root)
    return index


INDEX_STATE = """(() => {
  const tables = [...document.querySelectorAll('table')].map(t => ({
     head: [...t.querySelectorAll('thead th')].map(th => th.textContent.trim()),
     rows: [...t.querySelectorAll('tbody tr')].map(tr => [...tr.querySelectorAll('td')].map(td => td.textContent.trim()))}));
  const links = [...document.querySelectorAll('a[href]')].map(a => ({text: a.textContent.trim(), href: a.href}));
  return {title: document.title, tables, links};
})()"""


def _check_index_page(cdp: CDP, index: Path) -> dict:
    """Open an index.html from disk: it has tables, and every local link opens; returns the page state."""
    assert cdp.navigate(index.as_uri()) is None
    state = cdp.js(INDEX_STATE)
    assert state["tables"], "the index shows no table"
    local = sorted({link["href"].split("#")[0] for link in state["links"] if link["href"].startswith("file://")})
    assert local, "the index links to no result file"
    for href in local:
        error = cdp.navigate(href)
        assert error is None, f"link {href} does not open: {error}"
    state["local_links"] = local
    return state


# --------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def chromium() -> str:
    return ensure_chromium()


def test_jupyterlab_runs_notebook01_and_results_index_opens(chromium, tmp_path):
    started = time.perf_counter()
    root = tmp_path / "repo"                       # a copy: running in the browser must not touch notebooks/
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    shots = tmp_path / "screenshots"
    timings: dict[str, float] = {}

    with jupyterlab(root, tmp_path / "jupyter-home") as lab, chromium_session(chromium, tmp_path / "profile") as cdp:
        timings["servers up"] = time.perf_counter() - started
        assert cdp.navigate(lab.url(f"lab/tree/notebooks/{NOTEBOOK}")) is None
        # the notebook opens straight in the project kernel (no kernel picker), idle
        state = _wait_for(lambda: (s := cdp.js(NOTEBOOK_STATE))["n_cells"] and s["kernel_name"] == "fer-au (.venv)"
                          and s, 120, "notebook 01 to open with the fer-au (.venv) kernel")
        assert not state["dialogs"], f"unexpected dialog: {state['dialogs']}"
        sessions = _wait_for(lambda: lab.api("sessions"), 120, "JupyterLab to start the notebook's kernel")
        assert [s["kernel"]["name"] for s in sessions] == ["fer-au"]
        _wait_for(lambda: lab.api(f"kernels/{sessions[0]['kernel']['id']}")["execution_state"] == "idle", 120,
                  "the kernel to be idle")
        assert not any(p.strip()[1:-2].strip().isdigit() for p in state["prompts"]), "stored with outputs?"
        cdp.screenshot(shots / "01_opened.png")

        # Run > Run All Cells, with real mouse clicks on the menu
        t0 = time.perf_counter()
        cdp.click_text(".lm-MenuBar-itemLabel", "Run")
        cdp.click_text(".lm-Menu-itemLabel", "Run All Cells")
        _wait_for(lambda: any(p.strip() == "[*]:" for p in cdp.js(NOTEBOOK_STATE)["prompts"]) or
                  _executed(cdp.js(NOTEBOOK_STATE)), 60, "the cells to start running")
        state = _wait_for(lambda: (s := cdp.js(NOTEBOOK_STATE)) and _executed(s) and s, 420,
                          "every code cell to finish")
        _wait_for(lambda: lab.api(f"kernels/{sessions[0]['kernel']['id']}")["execution_state"] == "idle", 60,
                  "the kernel to be idle after the run")
        timings["run all cells"] = time.perf_counter() - t0
        numbers = [int(p.strip()[1:-2]) for p in state["prompts"]]
        assert numbers == list(range(1, len(numbers) + 1)), f"cells ran out of order: {state['prompts']}"
        assert not state["errors"], f"a cell shows an error: {state['errors']}"
        images = _wait_for(lambda: (s := cdp.js(NOTEBOOK_STATE))["images"] and all(i["done"] for i in s["images"])
                           and s["images"], 30, "the figures to load")
        assert len(images) >= 3 and all(i["w"] > 200 and i["h"] > 100 for i in images), images

        # the combined expression heatmap figure, scrolled into view, is what the screenshot shows
        heat = cdp.js("""(() => {
          const cell = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]
              .find(c => c.querySelector('.jp-InputArea').textContent.includes('plot_expression_maps'));
          const img = cell && cell.querySelector('.jp-OutputArea-output img');
          if (!img) return null;
          img.scrollIntoView({block: 'center'});
          const r = img.getBoundingClientRect();
          return {w: img.naturalWidth, h: img.naturalHeight, top: r.top, bottom: r.bottom};
        })()""")
        assert heat and heat["w"] > 800, f"the expression heatmap figure is not displayed: {heat}"
        time.sleep(1.0)
        shot = cdp.screenshot(shots / "01_heatmaps.png")
        assert shot.stat().st_size > 50_000
        if os.environ.get("FER_SAVE_SCREENSHOTS"):  # refresh the committed copy on request only:
            from fer_lib.utils import atomic_write_bytes  # a test run must not dirty the work tree

            atomic_write_bytes(SCREENSHOTS / "01_au_heatmaps_jupyterlab.png", shot.read_bytes())

        # save from the browser (Ctrl+S) and check what JupyterLab wrote
        saved = root / "notebooks" / NOTEBOOK
        before = saved.stat().st_mtime_ns
        cdp.key("s", "KeyS", 83, modifiers=2)
        _wait_for(lambda: saved.stat().st_mtime_ns != before, 30, "JupyterLab to save the notebook")
        nb = nbformat.read(saved, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        outputs = [o for c in code for o in c.get("outputs", [])]
        assert [c.execution_count for c in code] == numbers
        assert not [o for o in outputs if o.output_type == "error"]
        assert sum("image/png" in o.get("data", {}) for o in outputs) == len(images)
        assert nb.metadata.kernelspec.name == "fer-au"
        assert (root / "results" / "01_au_heatmaps" / "expression_heatmaps.png").stat().st_size > 10_000
        timings["notebook total"] = time.perf_counter() - started

        # results/index.html as fer_lib.workflow.pipeline builds it, from this executed notebook
        t0 = time.perf_counter()
        index = _build_results(tmp_path / "results", saved, root / "results" / "01_au_heatmaps" / "metrics.json")
        state = _check_index_page(cdp, index)
        headline = next(t for t in state["tables"] if "CAM-COS" in t["head"])
        assert headline["head"][:1] == ["model"] and {"accuracy", "ATT-COS", "CAM-COS"} <= set(headline["head"])
        rows = {r[0]: dict(zip(headline["head"], r)) for r in headline["rows"]}
        assert set(rows) == {"baseline", "AU-guided"}
        assert rows["baseline"]["accuracy"] == "0.801" and rows["AU-guided"]["ATT-COS"] == "0.861"
        assert rows["AU-guided"]["CAM-COS"] == "0.661" and rows["AU-guided"]["lambda"] == "9"
        runs = next(t for t in state["tables"] if "status" in t["head"])
        assert sorted(r[1] for r in runs["rows"]) == ["astronaut-1a2b3c", "baseline-aaaaaa", "guided-bbbbbb"]
        rendered = next(h for h in state["local_links"] if h.endswith("astronaut-1a2b3c/01_au_heatmaps.html"))
        assert cdp.navigate(index.as_uri()) is None
        cdp.screenshot(shots / "index.png")
        cdp.click_text("a", "astronaut-1a2b3c")      # a reader clicks the run: its rendered notebook opens
        _wait_for(lambda: cdp.js("location.href") == rendered and cdp.js("document.readyState") == "complete", 30,
                  "the rendered notebook to open from the index")
        page = cdp.js("""(() => ({imgs: [...document.images].map(i => ({w: i.naturalWidth, src: i.src.slice(0, 22)})),
                                 text: document.body.innerText}))()""")
        assert len(page["imgs"]) == len(images) and all(i["w"] > 200 and i["src"].startswith("data:image/png")
                                                        for i in page["imgs"]), "figures are embedded in the HTML"
        assert "Traceback" not in page["text"] and "Combined heatmap of every expression" in page["text"]
        cdp.screenshot(shots / "rendered_notebook.png")
        committed = REPO / "results" / "index.html"
        if committed.exists():            # the repository's own index, as the main job left it
            _check_index_page(cdp, committed)
        timings["index"] = time.perf_counter() - t0

    timings["total"] = time.perf_counter() - started
    print("browser test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"screenshots: {shots} and {SCREENSHOTS / '01_au_heatmaps_jupyterlab.png'}")
