"""Editing with class labels as the prompt, in two layers (and a table over them):

- :mod:`difflo.edit.operators` — the numerical operators (numerical core): the views of visual
  anagrams, the denoiser wrappers that combine predictions (anagram, hybrid, class-embedding mixes),
  the inpainting callback (RePaint), SDEdit's partial trajectories and DDIM inversion's steps;
- :mod:`difflo.edit.techniques` — the techniques a user runs (library): one typed function per
  technique over a :class:`difflo.model.Model`, each returning an ``EditResult`` that writes
  ``figure.png``, ``raw.npz`` and ``result_XX.png``;
- :mod:`difflo.edit.registry` — the table ``TECHNIQUES`` (library) that ``difflo edit`` and the web page
  read: each technique's flags, page fields, command line, evaluation count and ``run``.

This file imports nothing, so importing the operators never pulls in the library layer.
"""
