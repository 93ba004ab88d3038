"""Run by tests/test_parallel.py under torchrun (gloo): every case of IN_FILE on this rank; each rank
writes what it got to OUT_DIR/rank{r}.pt.

- transformer cases: a Transformer3D folder, a plan, the model's inputs -> ParallelTransformer's output
  and the bytes this rank sent (cogvx.parallel.cost.sent_bytes);
- pipeline cases: a pipeline folder, a plan, a call -> the latents after the call's denoising steps
  (output_type="latent") and Pipeline.decode of them (the context-parallel VAE).
"""
import sys

import torch
import torch.distributed as dist

from cogvx.models import Transformer3D
from cogvx.parallel import ParallelPlan, ParallelTransformer, runtime
from cogvx.parallel.cost import sent_bytes
from cogvx.pipeline import Pipeline

in_file, out_dir = sys.argv[1:3]
torch.set_num_threads(1)
runtime.init_process_group("cpu")
cases = torch.load(in_file, weights_only=False)
results, models = {}, {}
with torch.no_grad():
    for name, case in cases.get("transformer", {}).items():
        model = models.get(case["folder"]) or Transformer3D.from_pretrained(case["folder"])
        models[case["folder"]] = model
        plan = ParallelPlan.parse(case["plan"])
        runner = ParallelTransformer(model, plan, plan.mesh("cpu"))
        with sent_bytes() as sent:
            out = runner(**case["inputs"])
        results[name] = dict(out=out, sent=dict(sent))
    for name, case in cases.get("pipeline", {}).items():
        pipe = Pipeline.from_pretrained(case["folder"], dtype=torch.float32, parallel=case["plan"])
        latents = pipe(case["prompt"], generator=torch.Generator().manual_seed(case["seed"]), output_type="latent",
                       progress=False, **case["call"]).frames
        results[name] = dict(latents=latents, video=pipe.decode(latents))
torch.save(results, f"{out_dir}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
