"""difflo experiment: schedules, ema, steps, guidance, failure-modes (the command line: difflo.cli.experiment)."""
