"""Entry points: `python -m jobs.caption` (the batch job), `python -m jobs.demo`."""
