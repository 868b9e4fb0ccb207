"""Jobs: what each CLI command does, as plain functions that notebooks can call too.

A job takes plain arguments, writes a run folder (resolved config, metrics, checkpoint,
log) and returns its metrics as a dict. The CLI only parses arguments and calls a job.
"""
from camphive.jobs.evaluate import evaluate_job
from camphive.jobs.train import train_job

__all__ = ["train_job", "evaluate_job"]
