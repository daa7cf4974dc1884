"""The explorer in a real browser: JupyterLab (this environment's config) in headless Chromium.

Runs when Debian's Chromium is at /usr/bin/chromium (`.ci/run` installs it); by hand:
`make browser-check`. Drives Chromium through Playwright's client with the system binary
(no browser download). Saves a screenshot into the run folder.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("HOSA_CHROMIUM", "/usr/bin/chromium"))
pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]
# The flags this machine needs for a headless Chromium that makes no outside connections.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def jupyterlab(smoke_project, tmp_path):
    root, proc = smoke_project
    assert proc.returncode == 0, proc.stderr
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           "--IdentityProvider.token=check", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True",
           # a workspace of its own: the user's saved one (~/.jupyter/lab/workspaces, e.g. from `make lab`)
           # would restore other open notebooks over the one under test
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = (tmp_path / "lab.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/lab?token=check", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"JupyterLab did not answer: {(tmp_path / 'lab.log').read_text()[-2000:]}")
    yield root, url
    server.terminate()
    server.wait(20)


@pytest.mark.slow
def test_explorer_in_headless_chromium(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright
    root, url = jupyterlab
    nb = root / "notebooks" / "40_explore.ipynb"
    before = nb.read_bytes()
    run = next(p for p in (root / "outputs").glob("demo-*") if (p / "checkpoints").is_dir() and "-abl-" not in p.name)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/notebooks/40_explore.ipynb?token=check")
        page.wait_for_selector(".jp-Notebook", timeout=60_000)
        page.wait_for_function("window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel"
                               "?.connectionStatus === 'connected' && "
                               "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                               timeout=90_000)
        assert page.locator("text=official Jupyter news").count() == 0  # no announcement pop-up
        shot = run / "explorer_browser_check.png"
        try:
            ok = page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")  # Run > Run All Cells
            assert ok, "Run All Cells reported an error (see the screenshot)"
            box = page.locator(".widget-text input").first
            box.wait_for(timeout=180_000)
            table = page.locator(".widget-output table").first  # the caption box's top-K images
            table.wait_for(timeout=60_000)
            first = table.inner_text()
            box.fill("a large green triangle above a small yellow diamond")
            box.press("Enter")
            deadline = time.time() + 60
            while table.inner_text() == first and time.time() < deadline:
                time.sleep(0.5)
            second = table.inner_text()
        finally:
            page.locator(".widget-text input").first.scroll_into_view_if_needed(timeout=5_000)
            page.screenshot(path=str(shot), full_page=False)
            shutil.copy(shot, tmp_path / shot.name)
            print(f"screenshot: {shot}")
        assert second != first, "typing a caption did not change the top-K images"
        page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")  # the server's pre-save hook strips outputs
        time.sleep(2)
        browser.close()
    assert "image" in first and shot.stat().st_size > 20_000
    assert nb.read_bytes() == before, "saving the run notebook changed the file (outputs or metadata kept)"
