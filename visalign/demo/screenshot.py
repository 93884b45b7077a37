"""Headless-Chromium screenshot of the demo after one comparison (the README image and the browser test).

    .venv/bin/python -m visalign.demo.screenshot docs/images/demo_compare.png [LABEL=CHECKPOINT ...]

writes demo_compare.png (after a Compare), demo_compare_fk.png (its FK tab) and demo_compare_bad_prompt.png
(the message for a prompt outside the world's vocabulary).

Starts the demo on 127.0.0.1, drives Debian's chromium with Playwright (its bundled driver; the browser is the
system's, nothing is downloaded): loads the page, clicks Compare, waits for the score tables and the sample
gallery, and saves a full-page PNG. (A bare `chromium --screenshot` cannot wait for the job: its virtual-time
budget runs out before the comparison finishes.)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, out: str | Path, expected_images: int = 8, width: int = 1400, height: int = 1000,
               timeout_ms: int = 180_000, fk_out: str | Path | None = None) -> Path:
    """Load the demo at `url`, run one comparison with the page's default inputs (4 seeds × base and steered =
    8 images, more with aligned checkpoints), save a full-page PNG; with `fk_out`, then open the FK tab, wait for
    its lineage plot, ESS table and particle images, and save that page too."""
    from playwright.sync_api import sync_playwright  # optional: the dev extra installs it

    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium not found (Debian: apt-get install -y chromium)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, timeout=timeout_ms)
            page.get_by_role("button", name="Compare", exact=True).click()
            # Every column's samples are in the gallery once the job is done (the tables update with it).
            page.wait_for_function("n => document.querySelectorAll('button.thumbnail-item img').length >= n",
                                   arg=expected_images, timeout=timeout_ms)
            page.wait_for_timeout(1500)  # let the tables and plots draw
            page.screenshot(path=str(out), full_page=True)
            if fk_out is not None:
                page.get_by_role("tab", name="FK particles").click()
                # the ESS table's rows and the x0-prediction thumbnails of the visible tab
                page.wait_for_function("() => document.querySelectorAll('table tbody tr').length > 0 && "
                                       "[...document.querySelectorAll('button.thumbnail-item img')]"
                                       ".some(img => img.offsetParent !== null)", timeout=timeout_ms)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(Path(fk_out).resolve()), full_page=True)
        finally:
            browser.close()
    return out


def bad_prompt(url: str, prompt: str, out: str | Path, width: int = 1400, height: int = 1000,
               timeout_ms: int = 120_000) -> str:
    """Type `prompt` into the Compare tab, click Compare, wait for the message shown under the inputs, save a
    screenshot; returns the message's text."""
    from playwright.sync_api import sync_playwright

    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium not found (Debian: apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, timeout=timeout_ms)
            box = page.get_by_label("prompt").first
            box.fill(prompt)
            page.get_by_role("button", name="Compare", exact=True).click()
            message = page.locator("#compare-message")
            message.wait_for(state="visible", timeout=timeout_ms)
            page.wait_for_function("() => document.querySelector('#compare-message').innerText.trim().length > 0",
                                   timeout=timeout_ms)
            page.screenshot(path=str(Path(out).resolve()), full_page=True)
            return message.inner_text()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    # The app (torch, the models) loads only to serve: the tests' browser marker imports this module at collection.
    from visalign.demo.app import DemoConfig, launch, wait_idle

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/images/demo_compare.png")
    checkpoints = dict(a.split("=", 1) for a in argv[1:])
    app, url = launch(DemoConfig(checkpoints=checkpoints), block=False)
    fk_out, bad_out = (out.with_name(out.stem + suffix + out.suffix) for suffix in ("_fk", "_bad_prompt"))
    try:
        print(screenshot(url, out, expected_images=4 * (2 + len(checkpoints)), fk_out=fk_out))
        print(fk_out)
        bad_prompt(url, "a purple hexagon", bad_out)
        print(bad_out)
    finally:
        wait_idle(app)
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
