"""A study from one YAML file: the runner (`runner`) loops over methods × training sets × seeds, trains each
through its recipe and evaluates every model state through `harness.evals`."""
