"""The browser tests' chromium (Debian's, driven by Playwright; the ``browser`` fixture is in
conftest) and the steps a student takes in JupyterLab."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt install chromium)"
)

KERNEL_IDLE = (
    "() => /\\|\\s*Idle/.test(document.querySelector('.jp-StatusBar-Widget, "
    "#jp-main-statusbar')?.innerText || '')"
)
FORTY_TWO = (
    "() => [...document.querySelectorAll('.jp-OutputArea-output')]"
    ".some(e => e.innerText.trim() === '42')"
)


def watch_console(page) -> list[str]:
    """Collect console errors (a CSP violation shows up here)."""
    problems: list[str] = []
    page.on(
        "console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


def new_notebook(page):
    """A new notebook from JupyterLab's launcher, once its kernel is idle: its first cell's
    editor."""
    card = page.locator('.jp-LauncherCard[data-category="Notebook"]').first
    card.wait_for()
    card.click()
    editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").first
    editor.wait_for()
    # Run only once the kernel is there: an execute sent earlier can be dropped.
    page.wait_for_function(KERNEL_IDLE, timeout=120_000)
    return editor


def run_cell(page, editor, code: str) -> None:
    editor.click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")


def wait_for_42(page, editor) -> None:
    """Wait for an output of 42 (from ``print(6*7)``), running the cell again if the kernel
    was still starting."""
    for attempt in range(3):
        try:
            page.wait_for_function(FORTY_TWO, timeout=30_000 * (attempt + 1))
            break
        except Exception:
            if attempt == 2:
                raise
            editor.click()  # the kernel was still starting: run the cell again
            page.keyboard.press("Control+Enter")


def screenshot_on_failure(page, name: str) -> None:
    """Photograph ``page`` into test-artifacts/NAME, if it can still be photographed."""
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.suppress(Exception):
        page.screenshot(path=str(ARTIFACTS / name))
