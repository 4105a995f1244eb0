"""``difflo serve``: a local web page to sample, watch the denoising and edit (see difflo.serve)."""
from __future__ import annotations

import signal
import sys

from ..serve.app import App
from ..serve.server import make_server
from .argtypes import CKPT_HELP, add_null_class, port


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="a local web page to sample, watch the denoising, and edit",
                       description="Serve a web page on this machine for a checkpoint: sample with any "
                                   "class, guidance and sampler, watch the trajectory, edit images.")
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    add_null_class(s)
    s.add_argument("--fast", metavar="STUDENT",
                   help="a student distilled from --ckpt by difflo distill (any --ckpt form): the page gets a fast "
                        "preview button that samples with it at its own few steps")
    s.add_argument("--port", type=port, default=7860, help="port (default 7860; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    s.add_argument("--no-ema", dest="ema", action="store_false", default=True, help="use the raw weights")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=run)


def run(args) -> int:
    def stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)              # `kill` also stops cleanly (removes the job files)
    app = App(args.ckpt, ema=args.ema, device=args.device, null_class=args.null_class, fast=args.fast)
    httpd = make_server(app, args.host, args.port)
    h, p = httpd.server_address[:2]
    url = f"http://{'localhost' if h in ('127.0.0.1', '::1') else h}:{p}/"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {args.host}: anyone who can reach this machine can use the page", file=sys.stderr)
    print(f"difflo serve: {app.ckpt_arg} ({app.model.objective}, {app.model.num_classes} classes) at {url}\n"
          + (f"  fast preview: {app.fast_arg} ({app.fast.cfg.distill.method}, {app.fast.cfg.distill.steps} steps)\n"
             if app.fast is not None else "")
          + "  press Ctrl-C to stop", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        print("difflo serve: stopped", file=sys.stderr)
    finally:
        httpd.server_close()
        app.close()
    return 0
