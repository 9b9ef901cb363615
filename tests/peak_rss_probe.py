"""Run under torchrun by tests/test_parallel.py: build the Trainer from `CONFIG [--flags]` and print
this process's peak RSS, its share of the weights and the whole model's weights, in MB, as JSON.
With `checkpointer.init_from` set, also (after the RSS is read) the largest difference between the
model's gathered weights and the source's, read whole in this process."""

import json
import sys

import torch

from generated.names import InitFrom
from generated.parser import load_config
from runtime.distributed.utils import shutdown
from runtime.interop.sources import load_source
from runtime.trainer.trainer import Trainer

trainer = Trainer(load_config(sys.argv[1], argv=sys.argv[2:]))
params = list(trainer.model.parameters())
local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
report = {
    # VmHWM: this process's own peak (ru_maxrss would start at the forking parent's)
    "peak_rss_mb": int(
        next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]
    )
    / 1024,
    "local_weights_mb": local * 4 / 2**20,
    "model_weights_mb": sum(p.numel() for p in params) * 4 / 2**20,
}
source = trainer.cfg.checkpointer.init_from
if source != InitFrom.SCRATCH:
    want = load_source(source).weights()
    got = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).float()
        for k, v in trainer.model.state_dict().items()
    }  # collective: every process gathers every weight, in the same order
    report["compared"] = sorted(set(got) & set(want)) == sorted(got) and len(got)
    report["max_diff_vs_source"] = max((got[k] - want[k].float()).abs().max().item() for k in got)
sys.stdout.write(json.dumps(report) + "\n")  # one write: the processes share the pipe
sys.stdout.flush()
if torch.distributed.is_initialized():  # leave together: rank 0 holds the store the others use
    torch.distributed.barrier()
    trainer = params = None  # its FSDP state goes before the process groups (shutdown collects it)
    shutdown()
