"""Optuna learning-rate sweeps over the study runner (`search`): objectives, storage, workers."""
