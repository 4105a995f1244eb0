"""Screenshot the `difflo serve` page on any checkpoint with headless chromium (the README figure).

    python scripts/screenshot_serve.py --ckpt runs/demo/run --out docs/images/serve.png
    python scripts/screenshot_serve.py --ckpt runs/demo/run --out serve.png \
        --edit-out serve_edit.png --image assets/handdrawn_4.png --edit-class 4

Starts the server in this process on a free port, opens the page in Debian's chromium (Playwright,
no browser download), fills the Sample tab, clicks Generate, waits for the grid, moves the
trajectory slider to --frame, and saves a full-page screenshot. With --edit-out it also uploads
--image in the Edit tab, runs SDEdit toward --edit-class and saves that page too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflo.serve import browser as br
from difflo.serve.server import serve_in_thread

DONE = "s => ['done', 'error', 'cancelled'].includes(document.getElementById(s).textContent)"


def finish(page, status_id: str) -> None:
    page.wait_for_function(DONE, arg=status_id, timeout=1_800_000)
    status = page.text_content("#" + status_id)
    if status != "done":
        sys.exit(f"screenshot_serve: the job ended {status}: {page.text_content('#error')}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True, help="PNG of the Sample tab")
    ap.add_argument("--classes", default="all", help="'all' or a class index")
    ap.add_argument("--w", default="3")
    ap.add_argument("--sampler", help="default: the page's")
    ap.add_argument("--steps", default="50")
    ap.add_argument("--n", default="4", help="images per class")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--frame", type=float, default=0.5, help="trajectory slider position, 0..1 (default 0.5)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--edit-out", help="also a PNG of the Edit tab after SDEdit of --image")
    ap.add_argument("--image", default="assets/handdrawn_4.png")
    ap.add_argument("--edit-class", default="4")
    ap.add_argument("--strength", default="0.5")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    reason = br.why_not()
    if reason:
        sys.exit(f"screenshot_serve: {reason}")

    url, app, httpd = serve_in_thread(a.ckpt, device=a.device)
    try:
        with br.launch() as browser:
            page = br.new_page(browser, width=a.width, height=800)
            page.goto(url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            page.select_option("#s-class", a.classes)
            page.fill("#s-w", a.w)
            if a.sampler:
                page.select_option("#s-sampler", a.sampler)
            page.fill("#s-steps", a.steps)
            page.fill("#s-n", a.n)
            page.fill("#s-seed", a.seed)
            page.click("#s-generate")
            finish(page, "s-status")
            page.wait_for_function("() => document.getElementById('s-strip').naturalWidth > 0")
            last = int(page.get_attribute("#s-frame", "max"))
            page.fill("#s-frame", str(round(a.frame * last)))
            page.wait_for_function("() => document.getElementById('s-frame-img').complete")
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=a.out, full_page=True)
            print(f"wrote {a.out}")
            if a.edit_out:
                page.click("#tab-edit")
                page.set_input_files("#e-file", a.image)
                page.wait_for_function("() => document.getElementById('e-notes').textContent.startsWith('loaded')")
                page.select_option("#e-tech", "sdedit")
                page.select_option("#e-class", a.edit_class)
                page.fill("#e-strength", a.strength)
                page.fill("#e-w", a.w)
                page.click("#e-run")
                finish(page, "e-status")
                page.screenshot(path=a.edit_out, full_page=True)
                print(f"wrote {a.edit_out}")
            if page.js_errors:
                sys.exit(f"screenshot_serve: script errors on the page: {page.js_errors}")
    finally:
        httpd.shutdown()
        app.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
