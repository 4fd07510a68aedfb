"""One module per experiment; each exposes `run(...)` returning machine-readable results."""
