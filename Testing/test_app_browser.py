"""The browser app end to end in headless Chromium: the page loads and Slicer's views render,
errors show as messages and the app keeps working, and the loop (paint with the brush, fine-tune,
suggest a slice, export) puts the prediction's colour on the slice view.

The app runs as ``python -m pclseg.app`` on the built-in sample with a tiny training budget; the
browser is Debian's Chromium driven by Playwright. A screenshot of the loop's result is saved for
the README (``Resources/Screenshots/app.png``).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

CHROMIUM = Path(os.environ.get("PCLSEG_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "Resources" / "Screenshots" / "app.png"
VIEWPORT = {"width": 1280, "height": 800}
#: Rendering and training on a loaded 2-core CPU take a while; generous but finite waits.
START_TIMEOUT_S = 120
RENDER_TIMEOUT_MS = 90_000
JOB_TIMEOUT_MS = 300_000

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with status {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the app did not listen on port {port} within {timeout_s} s")


@pytest.fixture(scope="module")
def a_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app-work")


def serve_app(folder: Path, workdir: Path, *options: str) -> Iterator[str]:
    """Run ``python -m pclseg.app`` on a free port until the caller is done with its URL."""
    port = free_port()
    log = (workdir / f"app-{port}.log").open("w")
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pclseg.app", str(folder), "--port", str(port),
         "--workdir", str(workdir), *options],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        wait_for_port(port, process, START_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def an_app_url(a_sample_folder: Path, a_workdir: Path) -> Iterator[str]:
    """The app serving the sample, with a tiny training budget."""
    yield from serve_app(a_sample_folder, a_workdir, "--steps", "40", "--size", "32",
                         "--features", "4", "--pretrain-epochs", "1", "--device", "cpu")


@pytest.fixture(scope="module")
def a_browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def a_page(a_browser, an_app_url):
    page = a_browser.new_page(viewport=VIEWPORT)
    page.goto(an_app_url)
    page.wait_for_selector("#pcl-open", timeout=RENDER_TIMEOUT_MS)
    yield page
    page.close()


# --- helpers ---------------------------------------------------------------------------------


def message(page) -> str:
    node = page.query_selector("#pcl-message")
    return node.inner_text() if node else ""


def wait_for_message(page, text: str, timeout_ms: int = RENDER_TIMEOUT_MS) -> str:
    page.wait_for_function(
        "t => { const m = document.querySelector('#pcl-message');"
        " return m && m.innerText.includes(t); }",
        arg=text, timeout=timeout_ms,
    )
    return message(page)


def wait_until_idle(page, timeout_ms: int = JOB_TIMEOUT_MS) -> None:
    """Wait for the job card to go and the buttons to be usable again."""
    page.wait_for_function(
        "() => !document.querySelector('#pcl-job') && "
        "!document.querySelector('#pcl-finetune').disabled",
        timeout=timeout_ms,
    )


def axial_view(page):
    """The bounding box of the first (largest, axial) slice view's image."""
    page.wait_for_function(
        "() => { const i = document.querySelector('img'); return i && i.naturalWidth > 100; }",
        timeout=RENDER_TIMEOUT_MS,
    )
    return page.locator("img").first.bounding_box()


def open_first_volume(page) -> dict:
    page.click("#pcl-open")
    wait_for_message(page, "opened")
    page.wait_for_timeout(2000)  # the views re-render the new volume
    return axial_view(page)


def screenshot_array(page, path: Path) -> np.ndarray:
    page.screenshot(path=str(path))
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[..., :3].astype(int)


def tinted_pixels(rgb: np.ndarray, box: dict, color: tuple[int, int, int]) -> int:
    """Pixels of the view that lean towards ``color`` (the image itself is grey: R = G = B).

    A pixel counts when its chroma (max - min channel) is clear and its channel order matches
    the colour's, i.e. it is the overlay's colour blended over grey.
    """
    x0, y0 = int(box["x"]), int(box["y"])
    view = rgb[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"])]
    chroma = view.max(axis=-1) - view.min(axis=-1)
    order = np.argsort(color)[::-1]
    same_order = (view[..., order[0]] >= view[..., order[1]]) & (
        view[..., order[1]] >= view[..., order[2]]
    )
    return int(((chroma > 25) & same_order).sum())


def paint_stroke(page, box: dict, fx: float, fy: float, length: float = 0.12) -> None:
    """Drag the brush across the view, from (fx, fy) in view fractions, to the right."""
    x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x + step * length * box["width"] / 8, y, steps=2)
    page.mouse.up()


def next_slice(page, box: dict, slices: int) -> None:
    """Scroll the axial view by ``slices`` (the mouse wheel moves through slices)."""
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.9)
    for _ in range(abs(slices)):
        page.mouse.wheel(0, 120 if slices > 0 else -120)
        page.wait_for_timeout(300)


# --- tests -----------------------------------------------------------------------------------


def test_page_shows_slicer_views_and_the_pcl_panel(a_page):
    box = open_first_volume(a_page)
    assert box["width"] > 200 and box["height"] > 200
    assert a_page.locator("img").count() >= 4  # three slice views and the 3D view
    assert "fine-tune" in a_page.inner_text("#pcl-finetune").lower()


def test_errors_show_as_messages_and_the_app_keeps_working(a_page, a_sample_folder):
    open_first_volume(a_page)
    a_page.click("#pcl-finetune")
    assert "no annotation yet" in wait_for_message(a_page, "no annotation yet")

    a_page.fill("#pcl-folder", str(a_sample_folder / "missing"))
    a_page.press("#pcl-folder", "Enter")
    assert "no such folder" in wait_for_message(a_page, "no such folder")

    a_page.fill("#pcl-folder", str(a_sample_folder))
    a_page.press("#pcl-folder", "Enter")
    assert "volume(s) in" in wait_for_message(a_page, "volume(s) in")


def test_paint_fine_tune_suggest_and_see_the_prediction(a_page, a_workdir, tmp_path):
    from pclseg.labels import default_color
    from pclseg.sample import LABELS

    liver = default_color(1, LABELS[1])
    box = open_first_volume(a_page)
    baseline = tinted_pixels(screenshot_array(a_page, tmp_path / "opened.png"), box, liver)

    # Paint the liver region (upper patient right = screen left) on three slices.
    a_page.locator("#pcl-tools button:has(i.mdi-brush)").click()
    for step in (0, 2, 2):
        next_slice(a_page, box, step)
        for row in (0.36, 0.40, 0.44):
            paint_stroke(a_page, box, 0.28, row)
    a_page.wait_for_function(
        "() => document.querySelector('#pcl-annotated').innerText.split(',').length >= 3",
        timeout=RENDER_TIMEOUT_MS,
    )
    a_page.locator("#pcl-tools button:has(i.mdi-cursor-default)").click()

    a_page.click("#pcl-finetune")
    a_page.wait_for_selector("#pcl-job", timeout=RENDER_TIMEOUT_MS)
    wait_until_idle(a_page)
    assert "round 1" in wait_for_message(a_page, "round 1")

    a_page.click("#pcl-suggest")
    wait_for_message(a_page, "least sure")
    suggestion = a_page.inner_text("#pcl-suggestion")
    assert suggestion.startswith("Suggested slice")
    a_page.wait_for_timeout(3000)  # the views move to the suggested slice and re-render

    rgb = screenshot_array(a_page, tmp_path / "loop.png")
    assert tinted_pixels(rgb, box, liver) > baseline + 50, "no prediction colour on the slice view"

    a_page.click("#pcl-export")
    wait_for_message(a_page, "exported")
    exports = sorted(p.name for p in (a_workdir / "exports").iterdir())
    assert any(name.endswith(".seg.nrrd") for name in exports)
    assert any(name.endswith("-labels.nii.gz") for name in exports)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "loop.png", SCREENSHOT)


def test_a_token_keeps_out_browsers_without_it(a_browser, a_sample_folder, tmp_path):
    token = "team-secret-0123"
    for url in serve_app(a_sample_folder, tmp_path, "--token", token):
        page = a_browser.new_page(viewport=VIEWPORT)
        page.goto(url)
        page.wait_for_timeout(5000)
        assert page.query_selector("#pcl-open") is None  # the websocket refused the page
        page.goto(f"{url}?secret={token}")
        page.wait_for_selector("#pcl-open", timeout=RENDER_TIMEOUT_MS)
        page.close()
