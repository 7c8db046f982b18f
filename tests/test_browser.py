"""A real browser test: JupyterLab in Debian's Chromium, driven by Playwright.

It opens ``notebooks/01_explore_layers.ipynb`` (fast parameters baked in) in JupyterLab served on
127.0.0.1 with a token, runs every cell, changes the LayerExplorer's layer and checks that the
rendered images changed. Screenshots are kept under ``test-artifacts/``.

The browser is the system's Chromium (``apt-get install chromium``); the test never downloads one.
Without Chromium it is skipped, except under ``CI=true`` where it fails.
Run it alone with ``pytest -m browser tests/test_browser.py``.
"""

from __future__ import annotations

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
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _notebook_utils import ARTIFACTS, parameterized

pytestmark = pytest.mark.browser

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = (
            "Debian's chromium is not installed; enable this test with "
            "`sudo apt-get install chromium` or `scripts/ensure_chromium.sh`"
        )
        if IN_CI:
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return int(resp.status)


@contextlib.contextmanager
def jupyterlab(root: Path, home: Path) -> Iterator[tuple[str, str]]:
    """JupyterLab on 127.0.0.1 with a token, serving ``root``; yields (base url, token)."""
    port, token = _free_port(), secrets.token_hex(16)
    config = home / ".jupyter"
    (config / "labconfig").mkdir(parents=True)
    # no news pop-up, and no update check (no network)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    env = {
        **os.environ,
        "HOME": str(home),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # the kernel imports the checkout even when the package is not installed
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    }
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = (home / "jupyterlab.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with {proc.returncode}:\n"
                    + (home / "jupyterlab.log").read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(OSError):
                if _get(f"{base}/api/status?token={token}") == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not answer within 90 s")
            time.sleep(0.5)
        yield base, token
    finally:
        with contextlib.suppress(OSError):  # shuts down the kernels, then the server
            req = urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST", data=b""
            )
            urllib.request.urlopen(req, timeout=10).close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _kernel_name(page: object) -> str:
    loc = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar-kernelName")  # type: ignore[attr-defined]
    return loc.first.inner_text().strip() if loc.count() else ""


def test_layer_explorer_in_jupyterlab(tmp_path: Path) -> None:
    executable = _chromium()
    if IN_CI:
        from playwright.sync_api import sync_playwright
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
        sync_playwright = sync_api.sync_playwright
    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    home.mkdir()
    name = "01_explore_layers.ipynb"
    parameterized(name, root / name)
    ARTIFACTS.mkdir(exist_ok=True)

    with jupyterlab(root, home) as (base, token), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{name}?token={token}")
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for()

            # Run All before the kernel is known opens a "Select Kernel" dialog: wait for it
            deadline = time.monotonic() + 90
            while _kernel_name(page) in ("", "No Kernel", "Kernel"):
                assert time.monotonic() < deadline, "the notebook's kernel never started"
                page.wait_for_timeout(500)
            page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").first.click()

            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()

            # the explorer: a "layer" dropdown and six image panels
            layer = page.locator(".widget-dropdown", has=page.locator("label", has_text="layer"))
            layer = layer.filter(has_not_text="attribution").locator("select").first
            layer.wait_for(timeout=300_000)
            widget = page.locator(".widget-vbox", has=layer).first
            images = widget.locator(".widget-image")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.widget-image')]"
                ".filter(i => i.naturalWidth > 0).length >= 6",
                timeout=120_000,
            )
            assert images.count() >= 6
            errors = page.locator(
                ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] .ansi-red-fg, .jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"
            )
            assert errors.count() == 0, errors.first.inner_text()

            widget.scroll_into_view_if_needed()
            before = [images.nth(i).screenshot() for i in range(images.count())]
            widget.screenshot(path=str(ARTIFACTS / "browser_explorer_before.png"))

            options = layer.locator("option").all_inner_texts()
            assert len(options) >= 2, options
            current = layer.input_value()
            target = next(o for o in reversed(options) if o != current)
            layer.select_option(label=target)

            # the status line is written after every panel of the update has been swapped
            status = widget.locator(".widget-html").first
            deadline = time.monotonic() + 90
            while f"layer {target} " not in status.inner_text() + " ":
                assert time.monotonic() < deadline, f"status never showed {target!r}"
                page.wait_for_timeout(300)
            page.wait_for_timeout(500)  # let the browser decode the new PNGs
            after = [images.nth(i).screenshot() for i in range(images.count())]
            changed = sum(a != b for a, b in zip(before, after, strict=True))
            widget.screenshot(path=str(ARTIFACTS / "browser_explorer_after.png"))
            page.screenshot(path=str(ARTIFACTS / "browser_notebook.png"), full_page=True)
            assert changed >= 3, f"only {changed} image panels changed after choosing {target!r}"
            assert layer.input_value() == target
        finally:
            browser.close()
