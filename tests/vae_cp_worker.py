"""Run by tests/test_vae_parallel.py under torchrun: context-parallel encode and decode of the
inputs in IN_FILE with the VAE in FOLDER (layers in slices of SLICE_ELEMENTS, default the VAE's);
each rank writes what it got back to OUT_DIR/rank{r}.pt."""
import sys

import torch
import torch.distributed as dist

from cogvx.models.vae import CausalVAE
from cogvx.parallel import vae as cp

folder, in_file, out_dir = sys.argv[1:4]
torch.set_num_threads(1)
dist.init_process_group("gloo")
model = CausalVAE.from_pretrained(folder)
if len(sys.argv) > 4:
    model.set_chunking("diffusers", slice_elements=int(sys.argv[4]))
inputs = torch.load(in_file)
with torch.no_grad():
    posterior = cp.encode(model, inputs["video"])
    frames = cp.decode(model, inputs["latents"])
torch.save(dict(mean=posterior.mean, logvar=posterior.logvar, frames=frames), f"{out_dir}/rank{dist.get_rank()}.pt")
dist.destroy_process_group()
