"""Runtime: model, data, trainer and CLI built on the generated config classes."""
