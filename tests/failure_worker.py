"""Run by tests/test_parallel.py as ranks of a plain env:// launch: all-reduces in a loop under
cogvx.parallel.runtime.FailureGuard, where rank 1 misbehaves at step 3 as MODE says: "raise" (an
exception of its own) or "stall" (alive, heartbeating, but never reaching the next collective)."""
import sys
import time

import torch
import torch.distributed as dist

from cogvx.parallel import runtime

mode = sys.argv[1]
runtime.init_process_group("cpu")
with runtime.FailureGuard():
    x = torch.ones(4)
    for step in range(100):
        if dist.get_rank() == 1 and step == 3:
            if mode == "raise":
                raise RuntimeError("boom at step 3")
            time.sleep(120)
        dist.all_reduce(x)
        time.sleep(0.05)
print("finished")
