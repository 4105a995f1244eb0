"""`difflo serve` in a real browser: Debian's chromium, headless, driven by Playwright.

Skipped (with the reason) only where Playwright or chromium is not installed; .ci/run installs
both. Screenshots are written to ``test-artifacts/serve/`` (git-ignored).
"""
import base64
import io
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from difflo.serve import browser as br
from difflo.serve.server import serve_in_thread

REASON = br.why_not()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"browser tests skipped: {REASON}")
DONE = "s => ['done', 'error', 'cancelled'].includes(document.getElementById(s).textContent)"


@pytest.fixture(scope="module")
def url(tiny_run, tmp_path_factory):
    url, app, httpd = serve_in_thread(tiny_run, device="cpu", jobs_root=tmp_path_factory.mktemp("jobs"))
    yield url
    httpd.shutdown()
    httpd.server_close()
    app.close()


@pytest.fixture(scope="module")
def browser():
    with br.launch() as b:
        yield b


@pytest.fixture(scope="module")
def artifacts(pytestconfig):
    d = pytestconfig.rootpath / "test-artifacts" / "serve"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture
def page(browser, url):
    p = br.new_page(browser)
    p.goto(url + "/")
    p.wait_for_selector("body[data-ready='1']", timeout=30_000)
    yield p
    assert p.js_errors == []
    p.context.close()


def canvas(page, cid) -> np.ndarray:
    """A canvas's pixels (H, W, 4), read in the page."""
    data = page.evaluate("id => document.getElementById(id).toDataURL('image/png')", cid)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1]))).convert("RGBA"))


def fetch(url) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def finish(page, status_id, timeout=120_000) -> str:
    page.wait_for_function(DONE, arg=status_id, timeout=timeout)
    return page.text_content("#" + status_id)


@pytest.mark.slow
def test_generate_shows_the_grid(page, url, artifacts):
    placeholder = canvas(page, "s-grid")
    assert page.get_attribute("#s-grid", "data-placeholder") == "1"
    page.select_option("#s-class", "3")
    page.fill("#s-w", "2")                                       # the guidance slider
    page.fill("#s-steps", "4")
    page.fill("#s-n", "3")
    page.fill("#s-seed", "5")
    page.click("#s-generate")
    assert finish(page, "s-status") == "done", page.text_content("#error")
    grid = canvas(page, "s-grid")
    assert grid.shape != placeholder.shape or (grid != placeholder).any(axis=-1).mean() > 0.3
    # the canvas shows the server's grid.png (enlarged by a whole factor)
    png = np.asarray(Image.open(io.BytesIO(fetch(url + page.get_attribute("#s-png", "href")))).convert("RGBA"))
    k = grid.shape[1] // png.shape[1]
    assert k >= 1 and grid.shape[:2] == (png.shape[0] * k, png.shape[1] * k)
    assert np.array_equal(grid[::k, ::k], png)
    assert png[..., :3].std() > 10                              # not a flat image
    command = page.text_content("#s-command")
    assert "difflo sample --ckpt" in command and "--classes 3 --grid 3 --sampler ddpm --steps 4 --w 2 --seed 5" in command
    # the trajectory: a frame slider over the 4 recorded steps, and the strip
    assert page.get_attribute("#s-frame", "max") == "3"
    page.wait_for_function("() => document.getElementById('s-strip').naturalWidth > 0")
    page.wait_for_function("() => document.getElementById('s-frame-img').naturalWidth > 0")
    page.fill("#s-frame", "0")
    assert "step 1, t = 999" in page.text_content("#s-frame-t")
    page.screenshot(path=artifacts / "sample.png", full_page=True)


@pytest.mark.slow
def test_cancel_a_long_job(page, artifacts):
    page.fill("#s-steps", "1000")
    page.fill("#s-n", "16")
    page.click("#s-generate")
    page.wait_for_function("() => document.getElementById('s-status').textContent.startsWith('running')")
    page.click("#s-cancel")
    assert finish(page, "s-status") == "cancelled"
    assert page.get_attribute("#s-grid", "data-placeholder") == "1"
    page.screenshot(path=artifacts / "cancelled.png", full_page=True)


@pytest.mark.slow
def test_upload_and_sdedit(page, url, tmp_path, artifacts):
    four = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(four).line([(9, 5), (9, 15), (20, 15)], fill=255, width=3)
    ImageDraw.Draw(four).line([(17, 5), (17, 24)], fill=255, width=3)
    four.save(tmp_path / "four.png")
    page.click("#tab-edit")
    page.set_input_files("#e-file", str(tmp_path / "four.png"))
    page.wait_for_function("() => document.getElementById('e-notes').textContent.startsWith('loaded four.png')")
    assert canvas(page, "e-canvas")[..., 0].max() == 255        # the digit is on the drawing canvas
    before = canvas(page, "e-result")
    page.select_option("#e-tech", "sdedit")
    page.select_option("#e-class", "4")
    page.fill("#e-strength", "0.6")
    page.fill("#e-steps", "6")
    page.fill("#e-n", "2")
    page.click("#e-run")
    assert finish(page, "e-status") == "done", page.text_content("#error")
    after = canvas(page, "e-result")
    assert after.shape != before.shape or (after != before).any(axis=-1).mean() > 0.3
    # the server used the uploaded image itself (input.png), and the command names it
    used = np.asarray(Image.open(io.BytesIO(fetch(url + page.get_attribute("#e-input", "href")))))
    assert np.array_equal(used, np.asarray(four))
    command = page.text_content("#e-command")
    assert "difflo edit sdedit" in command and "--image input.png --class 4 --stride 166 --levels 4" in command
    fig = np.asarray(Image.open(io.BytesIO(fetch(url + page.get_attribute("#e-png", "href")))).convert("RGBA"))
    k = after.shape[1] // fig.shape[1]
    assert np.array_equal(after[::k, ::k], fig)
    page.screenshot(path=artifacts / "sdedit.png", full_page=True)


@pytest.mark.slow
def test_bad_upload_shows_the_error(page, tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    page.click("#tab-edit")
    page.set_input_files("#e-file", str(tmp_path / "notes.png"))
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.png: image is not an image Pillow can read" in page.text_content("#error")


@pytest.mark.slow
def test_draw_paint_mask_and_inpaint(page, url, artifacts):
    page.click("#tab-edit")
    page.select_option("#e-tech", "inpaint")
    assert page.is_checked("input[name=brush][value=mask]")      # inpaint picks the mask brush
    box = page.locator("#e-mask").bounding_box()
    x, y = box["x"], box["y"]

    def stroke(points):
        page.mouse.move(x + points[0][0], y + points[0][1])
        page.mouse.down()
        for px, py in points[1:]:
            page.mouse.move(x + px, y + py, steps=6)
        page.mouse.up()

    page.check("input[name=brush][value=draw]")
    stroke([(80, 50), (200, 50), (120, 240)])                    # a hand-drawn 7
    page.check("input[name=brush][value=mask]")
    page.fill("#e-brush", "48")
    stroke([(20, 200), (260, 200), (260, 250), (20, 250)])       # paint the bottom
    page.select_option("#e-class", "9")
    page.fill("#e-steps", "3")
    page.fill("#e-n", "2")
    page.click("#e-run")
    assert finish(page, "e-status") == "done", page.text_content("#error")
    inp = np.asarray(Image.open(io.BytesIO(fetch(url + page.get_attribute("#e-input", "href")))))
    mask = np.asarray(Image.open(io.BytesIO(fetch(url + page.get_attribute("#e-maskfile", "href")))))
    assert inp.shape == mask.shape == (28, 28)
    assert inp[4:6, 10:18].min() > 100                           # the top bar of the 7
    assert mask[:15].max() == 0 and mask[18:22, 3:25].min() == 255 and mask[24:27, 3:25].min() == 255
    assert "difflo edit inpaint" in page.text_content("#e-command")
    page.screenshot(path=artifacts / "inpaint.png", full_page=True)


@pytest.mark.slow
def test_fast_preview_button(browser, tiny_run, tmp_path_factory, artifacts):
    """With --fast STUDENT the page offers the student's preview; its grid is the student's, and the page
    says which model made it and how many network calls each image cost."""
    from difflo.distill import DistillOptions, distill

    student = tmp_path_factory.mktemp("student") / "student"
    distill(DistillOptions(teacher=str(tiny_run), method="progressive", teacher_steps=4, rounds=1, steps_per_round=2,
                           batch_size=4), student, device="cpu", log=lambda *a: None)
    url, app, httpd = serve_in_thread(tiny_run, device="cpu", jobs_root=tmp_path_factory.mktemp("jobs"), fast=student)
    p = br.new_page(browser)
    try:
        p.goto(url + "/")
        p.wait_for_selector("body[data-ready='1']", timeout=30_000)
        assert p.is_visible("#s-fast")
        assert p.text_content("#s-fast").startswith("Fast preview (2 steps, student of ")
        assert "2 network evaluations per image" in p.get_attribute("#s-fast", "title")
        p.select_option("#s-class", "4")
        p.fill("#s-n", "3")
        p.click("#s-fast")
        assert finish(p, "s-status") == "done", p.text_content("#error")
        summary = p.text_content("#s-summary")
        assert "by the progressive student" in summary and summary.endswith("2 network evaluations each")
        assert "difflo sample --ckpt" in p.text_content("#s-command") and "--w" not in p.text_content("#s-command")
        grid = canvas(p, "s-grid")
        png = np.asarray(Image.open(io.BytesIO(fetch(url + p.get_attribute("#s-png", "href")))).convert("RGBA"))
        k = grid.shape[1] // png.shape[1]
        assert np.array_equal(grid[::k, ::k], png)
        p.screenshot(path=artifacts / "fast.png", full_page=True)
        assert p.js_errors == []
    finally:
        p.context.close()
        httpd.shutdown()
        httpd.server_close()
        app.close()
