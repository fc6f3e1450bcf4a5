"""Reading finished runs back: the papers' figures (`figures`, one module per study and one for sweeps) and
the consistency report (`consistency`)."""
