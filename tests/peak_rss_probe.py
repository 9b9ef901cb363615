"""Run under torchrun by tests/test_parallel.py: build the Trainer from `CONFIG [--flags]` and print
this process's peak RSS, its share of the weights and the whole model's weights, in MB, as JSON."""

import json
import resource
import sys

from generated.parser import load_config
from runtime.train import Trainer

trainer = Trainer(load_config(sys.argv[1], argv=sys.argv[2:]))
params = list(trainer.model.parameters())
local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
print(
    json.dumps(
        {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "local_weights_mb": local * 4 / 2**20,
            "model_weights_mb": sum(p.numel() for p in params) * 4 / 2**20,
        }
    ),
    flush=True,
)
