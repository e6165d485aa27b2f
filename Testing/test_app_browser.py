"""The browser app end to end in headless Chromium: the page loads and Slicer's views render,
errors show as messages and the app keeps working, and the loop (pretrain with a decoder stage,
paint with the brush, fine-tune, suggest a slice, export) puts the prediction's colour on the
slice view.

The app runs as ``pclseg app`` on the built-in sample with a tiny training budget; the
browser is Debian's Chromium driven by Playwright. (The README's picture of the app comes from
``Resources/render.py``, on real data.)
"""

from __future__ import annotations

import os
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
    """Run ``pclseg app`` on a free port until the caller is done with its URL."""
    port = free_port()
    log = (workdir / f"app-{port}.log").open("w")
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pclseg", "app", str(folder), "--port", str(port),
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
    yield from serve_app(a_sample_folder, a_workdir, "--steps", "60", "--size", "32",
                         "--features", "4", "--pretrain-epochs", "3", "--device", "cpu")


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


def overlay_pixels(rgb: np.ndarray, box: dict, colors: list[tuple[int, int, int]]) -> int:
    """Pixels of the view showing one of ``colors`` blended over the grey image.

    A blend ``p = (1 - a) g (1, 1, 1) + a c`` of grey ``g`` and colour ``c`` has
    ``p - mean(p) = a (c - mean(c))``: its chroma points the colour's way. A pixel counts when
    its chroma is clear (> 20 levels) and within ~18 degrees of one of the colours'.
    """
    x0, y0 = int(box["x"]), int(box["y"])
    view = rgb[y0 : y0 + int(box["height"]), x0 : x0 + int(box["width"])].reshape(-1, 3)
    chroma = view - view.mean(axis=1, keepdims=True)
    strength = np.linalg.norm(chroma, axis=1)
    directions = np.array(colors, float) - np.mean(colors, axis=1, keepdims=True)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cosine = (chroma @ directions.T).max(axis=1) / np.maximum(strength, 1e-9)
    return int(((strength > 20) & (cosine > 0.95)).sum())


def paint_stroke(page, box: dict, fx: float, fy: float, length: float = 0.12) -> None:
    """Drag the brush across the view, from (fx, fy) in view fractions, to the right."""
    x, y = box["x"] + fx * box["width"], box["y"] + fy * box["height"]
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(1, 9):
        page.mouse.move(x + step * length * box["width"] / 8, y, steps=2)
    page.mouse.up()


def scroll_slices(page, box: dict, clicks: int) -> None:
    """Turn the mouse wheel over the axial view: one slice per click, down for ``clicks > 0``
    (towards inferior), up for ``clicks < 0``."""
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.9)
    for _ in range(abs(clicks)):
        page.mouse.wheel(0, 120 if clicks > 0 else -120)
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


def test_pretrain_paint_fine_tune_suggest_and_see_the_prediction(
    a_page, a_workdir, a_sample_folder, tmp_path
):
    from pclseg.app.workspace import segment_labels

    colors = [label.color for label in segment_labels(a_sample_folder)]
    a_page.fill("#pcl-decoder-epochs", "1")  # the encoder's epochs, then the decoder stage
    a_page.click("#pcl-pretrain")
    a_page.wait_for_selector("#pcl-job", timeout=RENDER_TIMEOUT_MS)
    assert "Pretraining" in a_page.inner_text("#pcl-job")
    wait_for_message(a_page, "encoder ready", JOB_TIMEOUT_MS)
    assert "runs" in a_page.input_value("#pcl-encoder")
    run_dir = Path(a_page.input_value("#pcl-encoder"))
    assert (run_dir / "unet.safetensors").is_file(), "the decoder stage did not run"

    box = open_first_volume(a_page)
    baseline = overlay_pixels(screenshot_array(a_page, tmp_path / "opened.png"), box, colors)

    # Paint the liver (upper patient right = screen left) on every other slice, going up.
    a_page.locator("#pcl-tools button:has(i.mdi-brush)").click()
    for clicks in (0, -2, -2):
        scroll_slices(a_page, box, clicks)
        for row in (0.34, 0.37, 0.40, 0.43, 0.46):
            paint_stroke(a_page, box, 0.22, row, length=0.22)
    a_page.wait_for_function(
        "() => document.querySelector('#pcl-annotated').innerText.split(',').length == 3",
        timeout=RENDER_TIMEOUT_MS,
    )
    annotated = [int(s) for s in a_page.inner_text("#pcl-annotated").split(":")[1].split(",")]
    assert annotated[1] - annotated[0] == annotated[2] - annotated[1] == 2
    a_page.locator("#pcl-tools button:has(i.mdi-cursor-default)").click()

    a_page.click("#pcl-finetune")
    a_page.wait_for_selector("#pcl-job", timeout=RENDER_TIMEOUT_MS)
    wait_until_idle(a_page)
    assert "round 1" in wait_for_message(a_page, "round 1")

    # Between two painted slices the prediction is drawn (on painted ones the user's paint is).
    scroll_slices(a_page, box, 1)
    a_page.wait_for_timeout(3000)  # the view re-renders
    rgb = screenshot_array(a_page, tmp_path / "loop.png")
    shown = overlay_pixels(rgb, box, colors)
    assert shown > baseline + 100, f"no prediction colour on the slice view ({shown} pixels)"

    a_page.click("#pcl-suggest")
    wait_for_message(a_page, "largest unannotated gap")
    suggested = int(a_page.inner_text("#pcl-suggestion").split(":")[0].split()[-1])
    assert suggested not in annotated

    a_page.click("#pcl-export")
    wait_for_message(a_page, "exported")
    exports = sorted(p.name for p in (a_workdir / "exports").iterdir())
    assert any(name.endswith(".seg.nrrd") for name in exports)
    assert any(name.endswith("-labels.nii.gz") for name in exports)


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
