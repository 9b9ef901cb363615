"""Model families. Each registers a ModelSpec: build, parallelize, state-dict adapter, cost."""
