"""The trainer: preparing a run (config, resume state, initial weights, run folder) and the
Trainer, assembled from the components."""
