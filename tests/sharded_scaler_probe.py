"""Run under torchrun (2 processes, gloo) by tests/test_parallel.py: a float16 gradient scaler over
an FSDP2-sharded model, where only rank 1's block of one gradient overflows. Prints, per process,
whether the gathered weights changed and the scale after the step, as JSON."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from runtime.distributed.precision import grad_scaler
from runtime.distributed.utils import shutdown

dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scaler = grad_scaler(torch.device("cpu"), torch.float16, sharded=True)
before = [p.full_tensor().clone() for p in model.parameters()]
scaler.scale(model(torch.ones(2, 8)).sum()).backward()
if dist.get_rank() == 1:  # an overflow in the block this process holds, and nowhere else
    with torch.no_grad():
        next(model.parameters()).grad.to_local().fill_(float("inf"))
scaler.unscale_(optimizer)
scaler.step(optimizer)
scaler.update()
after = [p.full_tensor() for p in model.parameters()]
changed = any(not torch.equal(a, b) for a, b in zip(before, after))
report = {"rank": dist.get_rank(), "changed": changed, "scale": scaler.get_scale()}
sys.stdout.write(json.dumps(report) + "\n")  # one write: the processes share the pipe
sys.stdout.flush()
model = optimizer = None
shutdown()  # collects the FSDP state before the process groups go
