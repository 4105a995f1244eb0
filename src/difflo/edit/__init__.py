"""Editing with class labels as the prompt, in two layers:

- :mod:`difflo.edit.operators` — the numerical operators (numerical core): the views of visual
  anagrams, the denoiser wrappers that combine predictions (anagram, hybrid, class-embedding mixes),
  the inpainting callback (RePaint), SDEdit's partial trajectories and DDIM inversion's steps;
- :mod:`difflo.edit.techniques` — the techniques a user runs (library): one typed function per
  technique over a :class:`difflo.model.Model`, each returning an ``EditResult`` that writes
  ``figure.png``, ``raw.npz`` and ``result_XX.png``. ``difflo edit`` and the web page call them.

This file imports nothing, so importing the operators never pulls in the library layer.
"""
