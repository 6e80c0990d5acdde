"""End to end: notebook 6 in a real JupyterLab, driven by Debian's headless Chromium through Selenium.

The other tests call the widget's callbacks from Python; only a browser shows that the widget renders in JupyterLab
(ipywidgets 8's frontend, jupyterlab_widgets, is installed and talks to the kernel) and that a click in the page
reaches the kernel and comes back as a new view. The test serves a copy of the notebook (JupyterLab autosaves, and the
repository's copy must stay without outputs) from a JupyterLab on a free port, with a temporary Jupyter config,
data and runtime folder and no token; runs every cell; clicks a token; checks the page; saves a screenshot to
``$QWEN3MOE_E2E_ARTIFACTS`` (default: the test's tmp_path) and prints where. The server is always stopped.

Needs ``apt-get install chromium chromium-driver`` (the browser and its matching driver come from Debian, nothing is
downloaded) and ``pip install -e .[dev]`` (jupyterlab, selenium); skips, saying which is missing, otherwise.
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

from qwen3moe.bundled import BUNDLED_MODEL

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "06_routing_explorer.ipynb"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytest.importorskip("jupyterlab", reason="the end-to-end test needs jupyterlab (pip install -e .[dev])")
pytest.importorskip("jupyterlab_widgets", reason="JupyterLab renders ipywidgets with jupyterlab_widgets")
pytest.importorskip("selenium", reason="the end-to-end test drives Chromium with selenium (pip install -e .[dev])")
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="the end-to-end test needs Debian's Chromium: apt-get install chromium chromium-driver"),
    pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").is_file(), reason="needs the bundled model"),
]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from qwen3moe.explorer_widget import DEFAULT_TEXT  # noqa: E402

RUN_ALL_CELLS = """
const done = arguments[arguments.length - 1];
const app = window.jupyterapp;
app.shell.currentWidget.sessionContext.ready
    .then(() => app.commands.execute("notebook:run-all-cells"))
    .then(ok => done(ok), error => done(String(error)));
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """The URL of a JupyterLab serving a copy of notebook 6; the server (and with it the kernel) is stopped after."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root)
    env = os.environ | {name: str(tmp_path / folder) for name, folder in
                        (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"))}
    # No "get notified about Jupyter news?" pop-up over the screenshot (and no fetch of the news).
    settings = tmp_path / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port = _free_port()
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--ServerApp.port_retries=0", "--IdentityProvider.token=", f"--ServerApp.root_dir={root}",
             "--ServerApp.allow_root=True",  # CI runs as root
             "--LabApp.extension_manager=readonly",  # no PyPI queries
             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp: run the cells through the app's commands
            env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start:\n{log.read_text()}")
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()  # a clean shutdown stops the kernels it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def chromium():
    """Debian's Chromium, headless, through Debian's chromedriver: with both paths given, Selenium downloads nothing."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_routing_explorer_notebook_in_jupyterlab(jupyterlab, chromium, tmp_path, capsys):
    chromium.get(f"{jupyterlab}/lab/tree/{NOTEBOOK.name}")
    WebDriverWait(chromium, 60).until(lambda d: d.execute_script(
        "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.content && w.content.widgets.length)"))
    chromium.set_script_timeout(180)
    assert chromium.execute_async_script(RUN_ALL_CELLS) is True, "a cell of the notebook failed in JupyterLab"

    # The widget rendered: one button per token, whose labels spell the text (Selenium reads no-break spaces as
    # spaces).
    buttons = WebDriverWait(chromium, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".qwen3moe-tokens button"))
    assert "".join(b.text for b in buttons) == DEFAULT_TEXT.replace("\n", "⏎")

    # A click in the page reaches the kernel, whose answer replaces the detail view.
    position = len(buttons) - 1  # the last token: the first one is selected from the start
    buttons[position].click()
    detail = WebDriverWait(chromium, 30).until(lambda d: [
        e for e in d.find_elements(By.CSS_SELECTOR, ".widget-html-content") if f"token {position} " in e.text])
    assert "chosen, weight" in detail[0].text and "entropy" in detail[0].text

    folder = Path(os.environ.get("QWEN3MOE_E2E_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / "routing_explorer_jupyterlab.png"
    widget = buttons[0].find_element(By.XPATH, "../..")  # the explorer: its token box's parent
    chromium.execute_script("arguments[0].scrollIntoView({block: 'start'})", widget)
    assert chromium.save_screenshot(str(screenshot))
    with capsys.disabled():
        print(f"\nscreenshot of the routing explorer in JupyterLab: {screenshot}")
