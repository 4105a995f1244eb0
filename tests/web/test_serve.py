"""`difflo serve` over HTTP, without a browser: validation, reproducing commands, cancelling, two clients."""
import base64
import io
import json
import shlex
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difflo import cli
from conftest import assert_clean_error, run_cli
from difflo.model import load_model
from difflo.noise_paths import samplers_for
from difflo.generate import generate, settings_for
from difflo.serve.server import serve_in_thread


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    url, app, httpd = serve_in_thread(tiny_run, device="cpu", jobs_root=tmp_path_factory.mktemp("jobs"))
    yield url, app
    httpd.shutdown()
    httpd.server_close()
    app.close()


def call(url, method="GET", body=None, raw: bytes | None = None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read()
            return r.status, (json.loads(payload) if r.headers["Content-Type"] == "application/json" else payload)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait(url, job_id, until=("done", "error", "cancelled"), timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        code, job = call(f"{url}/api/jobs/{job_id}")
        assert code == 200
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def digit(size=28) -> Image.Image:
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).line([(8, 6), (20, 6), (12, 22)], fill=255, width=3)
    return img


def run_shown(command: str, out, **replace) -> None:
    """Run a command shown by the page, with --out (and the named inputs) replaced by real paths."""
    argv = shlex.split(command)
    assert argv[0] == "difflo"
    argv = [replace.get(a, a) for a in argv[1:]]
    argv[argv.index("--out") + 1] = str(out)
    assert cli.main(argv) == 0


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """Samples in [-1, 1] as the page stores them: uint8 (N, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def assert_job_files(url, job, want: torch.Tensor, tmp_path) -> None:
    """The job's samples.npz holds ``want`` and its two shown commands rebuild grid.png and samples.npz."""
    png_cmd, npz_cmd = job["result"]["command"].splitlines()
    _, npz = call(f"{url}/api/jobs/{job['id']}/files/samples.npz")
    got = np.load(io.BytesIO(npz))
    assert np.array_equal(got["images"], as_uint8(want))
    run_shown(npz_cmd, tmp_path / "samples.npz")
    assert np.array_equal(np.load(tmp_path / "samples.npz")["images"], got["images"])
    _, png = call(f"{url}/api/jobs/{job['id']}/files/grid.png")
    run_shown(png_cmd, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes() == png


# ----------------------------------------------------------------------------- page and info
def test_page_and_info(server):
    url, _ = server
    with urllib.request.urlopen(url + "/", timeout=30) as r:
        html = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "Generate" in html and "http://" not in html and "https://" not in html
    for asset in ("/static/app.js", "/static/style.css"):
        with urllib.request.urlopen(url + asset, timeout=30) as r:
            text = r.read().decode()
        assert "http://" not in text and "https://" not in text          # nothing from the network
    code, info = call(url + "/api/info")
    assert code == 200
    assert info["samplers"] == info["edit_samplers"] == list(samplers_for("diffusion"))
    assert info["num_classes"] == 10 and info["class_names"][3] == "3"
    assert info["image_size"] == 28 and info["channels"] == 1
    assert info["defaults"]["guidance_interval"] == "" and info["defaults"]["guidance_rescale"] == 0.0
    assert "Kynkaanniemi" in info["help"]["guidance_interval"] and "Lin et al." in info["help"]["guidance_rescale"]
    assert 'id="s-interval"' in html and 'id="s-rescale"' in html


def test_binds_localhost_by_default():
    args = cli.build_parser().parse_args(["serve", "--ckpt", "x"])
    assert args.host == "127.0.0.1" and args.port == 7860


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli("serve", "--ckpt", tmp_path / "missing")
    assert assert_clean_error(code, err).startswith("difflo: error: checkpoint")
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--ckpt", "x", "--port", "70000"])
    assert e.value.code == 2
    assert "0..65535" in capsys.readouterr().err


def test_port_in_use_is_an_error(server, tiny_run, capsys):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    assert cli.main(["serve", "--ckpt", str(tiny_run), "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("body, words", [
    ({"steps": 0}, "steps must be a whole number from 1 to 1000"),
    ({"steps": 5000}, "steps must be a whole number from 1 to 1000"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"n": 0}, "n must be a whole number from 1 to 16"),
    ({"n": 17}, "n must be a whole number from 1 to 16"),
    ({"w": -1}, "w must be a number from 0 to 20"),
    ({"w": "abc"}, "w must be a number"),
    ({"steps": float("inf")}, "steps must be a whole number from 1 to 1000, got inf"),
    ({"w": float("nan")}, "w must be a number from 0 to 20, got nan"),
    ({"sampler": "euler"}, "sampler must be one of ddpm, ddim"),
    ({"classes": 10}, "classes must be a whole number from 0 to 9"),
    ({"seed": -1}, "seed must be a whole number from 0"),
    ({"guidance_interval": "3,1"}, "guidance_interval=3,1 must be two noise levels lo,hi (sigma/alpha) with 0 <= lo"),
    ({"guidance_interval": "abc"}, "guidance_interval: expected two finite numbers LO,HI"),
    ({"guidance_interval": "-1,2"}, "guidance_interval=-1,2 must be two noise levels"),
    ({"guidance_interval": [0.5, 2]}, "guidance_interval must be text LO,HI"),
    ({"guidance_rescale": 2}, "guidance_rescale must be a number from 0 to 1, got 2"),
    ({"guidance_rescale": ""}, "guidance_rescale must be a number from 0 to 1"),
])
def test_sample_validation(server, body, words):
    url, _ = server
    code, out = call(url + "/api/sample", "POST", {"steps": 2, **body})
    assert code == 400, out
    assert words in out["error"] and "\n" not in out["error"]


def test_bad_json(server):
    url, _ = server
    for raw in (b'{"w": 3,', b"[1, 2]", b"\xff"):
        code, out = call(url + "/api/sample", "POST", raw=raw)
        assert code == 400 and ("not valid JSON" in out["error"] or "must be a JSON object" in out["error"])


def test_image_validation(server, tmp_path):
    url, _ = server
    code, out = call(url + "/api/upload", "POST", {"image": "data:image/png;base64,!!!"})
    assert code == 400 and "not valid base64" in out["error"]
    code, out = call(url + "/api/upload", "POST", {"image": base64.b64encode(b"hello, not an image").decode()})
    assert code == 400 and "not an image" in out["error"]
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="TIFF")
    code, out = call(url + "/api/upload", "POST", {"image": base64.b64encode(buf.getvalue()).decode()})
    assert code == 400 and "TIFF" in out["error"] and "PNG" in out["error"]
    code, out = call(url + "/api/upload", "POST", {"image": png_url(Image.new("L", (4097, 2)))})
    assert code == 400 and "4097x2 pixels; the limit is 4096x4096" in out["error"]
    code, out = call(url + "/api/upload", "POST", {"image": png_url(Image.new("RGBA", (56, 40), (255, 0, 0, 255)))})
    assert code == 200 and out["notes"] == ["image: resized 56x40 to the model's 28x28"]
    img = Image.open(io.BytesIO(base64.b64decode(out["image"].split(",", 1)[1])))
    assert img.size == (28, 28) and img.mode == "L"
    code, out = call(url + "/api/edit", "POST", {"technique": "inpaint", "image": png_url(digit()), "steps": 2,
                                                 "mask": png_url(Image.new("L", (28, 28)))})
    assert code == 400 and "the mask is empty" in out["error"]
    code, out = call(url + "/api/edit", "POST", {"technique": "hybrid", "kernel_size": 8})
    assert code == 400 and "kernel_size must be odd" in out["error"]
    code, out = call(url + "/api/edit", "POST", {"technique": "sdedit", "class": 3})
    assert code == 400 and "image is required" in out["error"]
    code, out = call(url + "/api/edit", "POST", {"technique": "blur"})
    assert code == 400 and "technique must be one of sdedit, inpaint, anagram, hybrid" in out["error"]
    code, out = call(url + "/api/jobs/0123456789abcdef")
    assert code == 404


# ----------------------------------------------------------------------------- results = the CLI's
def test_sample_reproduced_by_its_command(server, tmp_path):
    url, _ = server
    code, job = call(url + "/api/sample", "POST",
                     {"classes": 3, "n": 2, "w": 2.5, "sampler": "ddpm", "steps": 4, "seed": 7})
    assert code == 202
    job = wait(url, job["id"])
    assert job["status"] == "done" and job["done"] == job["total"] == 4
    assert [f["i"] for f in job["frames"]] == [0, 1, 2, 3]
    png_cmd, npz_cmd = job["result"]["command"].splitlines()
    assert "--classes 3 --grid 2 --sampler ddpm --steps 4 --w 2.5 --seed 7" in png_cmd
    assert "--guidance" not in png_cmd                                   # at the model's defaults: not shown
    base = f"{url}/api/jobs/{job['id']}/files/"
    _, png = call(base + "grid.png")
    _, npz = call(base + "samples.npz")
    run_shown(png_cmd, tmp_path / "grid.png")
    run_shown(npz_cmd, tmp_path / "samples.npz")
    assert (tmp_path / "grid.png").read_bytes() == png
    served, cli_npz = np.load(io.BytesIO(npz)), np.load(tmp_path / "samples.npz")
    assert np.array_equal(served["images"], cli_npz["images"])
    assert served["labels"].tolist() == cli_npz["labels"].tolist() == [3, 3]
    _, frame = call(f"{url}/api/jobs/{job['id']}/frames/3.png")
    assert Image.open(io.BytesIO(frame)).size[0] > 2 * 28            # x_t and x0 of both images


def test_sample_guidance_reproduced(server, tiny_run, tmp_path):
    """A guidance interval and rescale: the same images as generate with those settings, and as the command shown."""
    url, _ = server
    body = {"classes": 5, "n": 2, "w": 4, "steps": 4, "seed": 11, "guidance_interval": " 0.5,5 ",
            "guidance_rescale": 0.7}
    code, job = call(url + "/api/sample", "POST", body)
    assert code == 202, job
    job = wait(url, job["id"])
    assert job["status"] == "done", job.get("error")
    png_cmd = job["result"]["command"].splitlines()[0]
    assert "--w 4 --guidance-interval 0.5,5 --guidance-rescale 0.7 --seed 11" in png_cmd
    summary = job["result"]["summary"]                                   # the settings generate ran with
    assert "guidance_interval=(0.5, 5.0)" in summary and "guidance_rescale=0.7" in summary
    model = load_model(tiny_run)
    want = generate(model, torch.full((2,), 5), [11, 12],
                    settings_for(model, steps=4, w=4.0, guidance_interval=(0.5, 5.0), guidance_rescale=0.7))
    assert_job_files(url, job, want, tmp_path)


def test_sample_guidance_off_over_a_run_default(tiny_run, tmp_path):
    """A model whose config guides in an interval: the page defaults to it; an empty interval is off,
    shown as --guidance-interval off (and a rescale back to 0 as --guidance-rescale 0)."""
    from difflo.serve.app import App

    app = App(tiny_run, device="cpu", jobs_root=tmp_path / "jobs")
    try:
        sc = app.model.cfg.sample
        sc.guidance_interval, sc.guidance_rescale = (0.25, 3.0), 0.5
        defaults = app.info()["defaults"]
        assert defaults["guidance_interval"] == "0.25,3" and defaults["guidance_rescale"] == 0.5
        jobs = [app.submit_sample({"classes": 0, "n": 1, "steps": 1, **body}) for body in
                ({}, {"guidance_interval": "", "guidance_rescale": 0}, {"guidance_interval": "off"})]
        t0 = time.time()
        while any(j.status in ("queued", "running") for j in jobs):
            assert time.time() - t0 < 60
            time.sleep(0.02)
        assert [j.status for j in jobs] == ["done"] * 3, [j.error for j in jobs]
        (cmd, _), (off, _), (off2, _) = (j.result["command"].splitlines() for j in jobs)
        assert "--guidance" not in cmd
        assert "guidance_interval=(0.25, 3.0), guidance_rescale=0.5" in jobs[0].result["summary"]
        assert "--guidance-interval off --guidance-rescale 0 " in off and "--guidance-interval off --seed" in off2
        assert "guidance_interval=(), guidance_rescale=0.0" in jobs[1].result["summary"]
    finally:
        app.close()


@pytest.mark.slow
@pytest.mark.parametrize("technique, extra", [
    ("sdedit", {"class": 4, "strength": 0.5}),
    ("inpaint", {"class": 9, "jump_length": 2, "jump_n_sample": 2}),
    ("anagram", {"a": 6, "b": 9, "view": "flip"}),
    ("hybrid", {"low": 0, "high": 1, "kernel_size": 5, "sigma": 1.0}),
])
def test_edit_reproduced_by_its_command(server, tmp_path, technique, extra):
    url, _ = server
    mask = Image.new("L", (140, 140), 0)
    ImageDraw.Draw(mask).rectangle([0, 70, 139, 139], fill=255)          # bottom half, at 5x the model size
    body = {"technique": technique, "n": 2, "seed": 3, "w": 2, "steps": 4, "image": png_url(digit(140)),
            "mask": png_url(mask), **extra}
    code, job = call(url + "/api/edit", "POST", body)
    assert code == 202, job
    job = wait(url, job["id"])
    assert job["status"] == "done", job.get("error")
    files = job["result"]["files"]
    base = f"{url}/api/jobs/{job['id']}/files/"
    replace = {}
    for name in ("input", "mask"):
        if name in files:
            _, data = call(base + files[name])
            (tmp_path / f"{name}.png").write_bytes(data)
            replace[f"{name}.png"] = str(tmp_path / f"{name}.png")
    assert ("input" in files) == (technique in ("sdedit", "inpaint"))
    run_shown(job["result"]["command"], tmp_path / "out", **replace)
    _, fig = call(base + files["png"])
    assert (tmp_path / "out" / "figure.png").read_bytes() == fig
    _, raw = call(base + files["npz"])
    served, cli_raw = np.load(io.BytesIO(raw)), np.load(tmp_path / "out" / "raw.npz")
    assert sorted(served.files) == sorted(cli_raw.files)
    for k in served.files:
        assert np.array_equal(served[k], cli_raw[k])
    if technique == "inpaint":                                           # the known top half is kept
        inp = np.asarray(Image.open(tmp_path / "input.png"))
        out = served["inpainted"][:, :14, :, 0]
        assert np.abs(out.astype(int) - inp[None, :14]).max() <= 1


# ----------------------------------------------------------------------------- cancelling, two clients
def test_cancel_running_and_queued(server):
    url, _ = server
    _, a = call(url + "/api/sample", "POST", {"classes": 0, "n": 1, "steps": 1000, "sampler": "ddim"})
    _, b = call(url + "/api/sample", "POST", {"classes": 1, "n": 1, "steps": 3})
    wait(url, a["id"], until=("running",))
    t0 = time.time()
    while call(f"{url}/api/jobs/{a['id']}")[1]["done"] < 2:
        assert time.time() - t0 < 60
        time.sleep(0.02)
    code, _ = call(f"{url}/api/jobs/{b['id']}/cancel", "POST")          # still queued behind a
    assert code == 200
    call(f"{url}/api/jobs/{a['id']}/cancel", "POST")
    a = wait(url, a["id"])
    b = wait(url, b["id"])
    assert a["status"] == "cancelled" and 2 <= a["done"] < 1000 and "result" not in a
    assert b["status"] == "cancelled" and b["done"] == 0
    _, c = call(url + "/api/sample", "POST", {"classes": 2, "n": 1, "steps": 2})     # the server goes on
    assert wait(url, c["id"])["status"] == "done"


def test_two_clients_at_once(server, tiny_run):
    url, _ = server
    bodies = [{"classes": 1, "n": 2, "steps": 3, "seed": 0, "w": 1},
              {"classes": 8, "n": 3, "steps": 5, "seed": 100, "w": 4}]
    jobs = [None, None]

    def client(k):
        code, job = call(url + "/api/sample", "POST", bodies[k])
        assert code == 202
        jobs[k] = wait(url, job["id"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert jobs[0]["id"] != jobs[1]["id"]
    model = load_model(tiny_run)
    for body, job in zip(bodies, jobs):
        assert job["status"] == "done" and job["total"] == body["steps"]
        _, npz = call(f"{url}/api/jobs/{job['id']}/files/samples.npz")
        got = np.load(io.BytesIO(npz))
        labels = torch.full((body["n"],), body["classes"])
        want = generate(model, labels, [body["seed"] + i for i in range(body["n"])],
                        settings_for(model, steps=body["steps"], w=body["w"]))   # the run's own sampler, as the page
        assert got["labels"].tolist() == labels.tolist()
        assert np.array_equal(got["images"], as_uint8(want))


@pytest.mark.slow
def test_flow_checkpoint(tmp_path):
    """A flow model: its samplers, Heun (two evaluations a step) in sampling and SDEdit, as the CLI."""
    from conftest import tiny_config

    from difflo.serve.app import App
    from difflo.train import train

    flow = ["diffusion.objective=flow", "diffusion.prediction=u", "sample.sampler=euler", "sample.steps=4"]
    train(tiny_config(*flow, "train.steps=2", "train.ckpt_every=2"), tmp_path / "run", log=lambda *a: None)
    app = App(tmp_path / "run", device="cpu", jobs_root=tmp_path / "jobs")
    try:
        info = app.info()
        assert info["samplers"] == list(samplers_for("flow")) and info["defaults"]["edit_sampler"] == "euler"
        jobs = [app.submit_sample({"classes": 2, "n": 1, "steps": 3, "sampler": "heun"}),
                app.submit_edit({"technique": "sdedit", "image": png_url(digit()), "class": 5, "strength": 1.0,
                                 "steps": 4, "sampler": "heun", "n": 1})]
        t0 = time.time()
        while any(j.status in ("queued", "running") for j in jobs):
            assert time.time() - t0 < 60
            time.sleep(0.02)
        assert [j.status for j in jobs] == ["done", "done"], [j.error for j in jobs]
        edit = jobs[1]
        assert edit.total == 2 * 4 and "--stride 250 --levels 4" in edit.result["command"]
        (tmp_path / "input.png").write_bytes((edit.dir / "input.png").read_bytes())
        run_shown(edit.result["command"], tmp_path / "out", **{"input.png": str(tmp_path / "input.png")})
        assert (tmp_path / "out" / "figure.png").read_bytes() == (edit.dir / "figure.png").read_bytes()
    finally:
        app.close()


# ----------------------------------------------------------------------------- fast preview (--fast STUDENT)
@pytest.fixture(scope="module")
def student(tiny_run, tmp_path_factory):
    """A 2-step progressive student of the tiny run (one round from 4 teacher steps)."""
    from difflo.distill import DistillOptions, distill

    out = tmp_path_factory.mktemp("student") / "student"
    distill(DistillOptions(teacher=str(tiny_run), method="progressive", teacher_steps=4, rounds=1, steps_per_round=2,
                           batch_size=4), out, device="cpu", log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def fast_server(tiny_run, student, tmp_path_factory):
    url, app, httpd = serve_in_thread(tiny_run, device="cpu", jobs_root=tmp_path_factory.mktemp("jobs"),
                                      fast=student)
    yield url, app
    httpd.shutdown()
    httpd.server_close()
    app.close()


def test_fast_info(server, fast_server, tiny_run, student):
    _, info = call(server[0] + "/api/info")
    assert info["fast"] is None                                          # without --fast: nothing
    code, info = call(fast_server[0] + "/api/info")
    assert code == 200
    fast = info["fast"]
    assert fast["method"] == "progressive" and fast["steps"] == fast["sample_steps"] == 2
    assert fast["sampler"] == "ddim" and fast["evals"] == 2 and fast["w"] == load_model(tiny_run).cfg.sample.w
    assert fast["ckpt"] == fast_server[1].fast_arg                       # the exact checkpoint, as in the commands
    assert Path(fast["ckpt"]).resolve().parent == (student / "checkpoints").resolve()
    assert Path(fast["teacher"]).resolve() == tiny_run.resolve()
    with urllib.request.urlopen(fast_server[0] + "/static/app.js", timeout=30) as r:
        assert "Fast preview (" in r.read().decode()


def test_fast_job_is_the_students_and_reproduced(fast_server, student, tmp_path):
    url, app = fast_server
    code, job = call(url + "/api/sample", "POST", {"classes": 4, "n": 3, "seed": 5, "fast": True})
    assert code == 202, job
    job = wait(url, job["id"])
    assert job["status"] == "done", job.get("error")
    assert job["done"] == job["total"] == 2                              # the student's steps
    png_cmd = job["result"]["command"].splitlines()[0]
    assert png_cmd.startswith(f"difflo sample --ckpt {shlex.quote(app.fast_arg)} --classes 4 --grid 3 ")
    assert "--w" not in png_cmd and "--null-class" not in png_cmd
    summary = job["result"]["summary"]
    assert f"3 images by the progressive student {app.fast_arg} (2 steps" in summary
    assert summary.endswith("; 2 network evaluations each") and "sampler=ddim" in summary
    model = load_model(student)
    want = generate(model, torch.full((3,), 4), [5, 6, 7], settings_for(model))     # its own settings
    assert_job_files(url, job, want, tmp_path)
    code, full = call(url + "/api/sample", "POST", {"classes": 4, "n": 1, "steps": 3, "fast": False})
    full = wait(url, full["id"])                                         # the full sampler names its model too
    assert full["result"]["summary"].startswith(f"1 images by {app.ckpt_arg}: ")
    assert full["result"]["command"].startswith(f"difflo sample --ckpt {shlex.quote(app.ckpt_arg)} ")


@pytest.mark.parametrize("body, words", [
    ({"sampler": "ddim"}, "also sets sampler='ddim': drop it, or sample without fast"),
    ({"steps": 7, "w": 0}, "also sets steps=7, w=0: drop them"),
    ({"guidance_interval": "0.5,2"}, "also sets guidance_interval='0.5,2'"),
    ({"steps": 0}, "steps must be a whole number from 1 to 1000"),        # a bad value: its usual message
    ({"fast": "yes"}, "fast must be true or false"),
])
def test_fast_conflicts_are_one_line_400(fast_server, body, words):
    url, app = fast_server
    code, out = call(url + "/api/sample", "POST", {"fast": True, "classes": 1, "n": 1, **body})
    assert code == 400, out
    assert words in out["error"] and "\n" not in out["error"]
    if "also sets" in words:
        assert "the student's own settings (ddim, 2 steps, w=1)" in out["error"]


def test_fast_defaults_are_not_a_conflict(fast_server):
    """The page's untouched full-sampler fields (its defaults) are no conflict."""
    url, _ = fast_server
    _, info = call(url + "/api/info")
    d = info["defaults"]
    body = {k: d[k] for k in ("sampler", "steps", "w", "spacing", "guidance_interval", "guidance_rescale")}
    code, job = call(url + "/api/sample", "POST", {**body, "fast": True, "classes": 2, "n": 1})
    assert code == 202, job
    assert wait(url, job["id"])["status"] == "done"


def test_fast_without_a_student_is_a_400(server):
    code, out = call(server[0] + "/api/sample", "POST", {"fast": True, "classes": 1, "n": 1})
    assert code == 400 and "start difflo serve with --fast STUDENT" in out["error"]


def test_fast_not_a_student_is_one_line(tiny_run, tmp_path):
    from difflo import checkpoint
    from difflo.config import DistillConfig
    from difflo.model import build_net

    code, _, err = run_cli("serve", "--ckpt", tiny_run, "--fast", tiny_run, "--port", 0)
    assert_clean_error(code, err, f"--fast {tiny_run} is not a distilled student", "difflo distill")
    code, _, err = run_cli("serve", "--ckpt", tiny_run, "--fast", tmp_path / "missing", "--port", 0)
    assert_clean_error(code, err, "--fast: checkpoint")
    cfg = load_model(tiny_run).cfg                                       # a "student" of another model: unconditional
    cfg.model.num_classes = 0
    cfg.distill = DistillConfig(teacher=str(tiny_run), method="progressive", steps=2, teacher_steps=4, w=1.0)
    torch.manual_seed(0)
    sd = build_net(cfg).state_dict()
    checkpoint.save_checkpoint(tmp_path / "other", 1, cfg.to_dict(), sd, sd, {"step": 1})
    code, _, err = run_cli("serve", "--ckpt", tiny_run, "--fast", tmp_path / "other", "--port", 0)
    assert_clean_error(code, err, "does not fit --ckpt: classes 0 vs 10")
