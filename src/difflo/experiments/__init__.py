"""difflo experiment: schedules, ema, steps, guidance, failure-modes (see cli.py)."""
