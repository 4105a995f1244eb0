"""Evaluation: a small classifier trained on real images, used to score class-conditional samples."""
