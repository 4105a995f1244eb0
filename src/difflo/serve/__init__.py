"""``difflo serve``: a local web page to sample from a checkpoint, watch it denoise, and edit images.

:mod:`.server` is the HTTP layer (stdlib ``http.server``), :mod:`.app` validates requests and runs
the work through :mod:`difflo.generate` and :mod:`difflo.edit.techniques`, :mod:`.jobs` is the job queue;
the page is ``static/`` (plain HTML/JS/CSS, no external resources).
"""
