"""The evaluation stage: benchmarks (which prompts, how their responses are scored, which numbers head the
summary) and the stored steps that evaluate one model state (generation records, then judgements).

`benchmarks.py` holds the registry: adding a benchmark is one class there. `state.py` evaluates a model state
under its checkpoint run and computes only what the store lacks.
"""
