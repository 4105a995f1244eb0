"""Studies that train small models and write reports: the Difflo seed's questions and the denoiser study.

``difflo experiment`` (:mod:`difflo.cli.experiment`): ``schedules`` (linear vs cosine vs sigmoid),
``ema`` (raw vs EMA weights), ``steps`` (quality vs NFE per sampler), ``guidance`` (the scale w),
``failure-modes`` (low-compute failures), ``scarcity`` (per-class data scarcity); ``common`` holds
what they share (cached training runs, measuring a sampler setting, the report writer).

``difflo study denoiser`` (:mod:`difflo.cli.study`): ``denoiser`` (a single-step denoising UNet on
mnist10k) with its figures, tables and summary in ``denoiser_report``.
"""
