"""Run by tests/test_vae_parallel.py under torchrun: context-parallel training steps (each rank only
its own frames) for the cases in IN_FILE, with the VAE in FOLDER; each rank writes, per case, its
loss share, its input frames' gradient and the parameter gradients after `sum_gradients` to
OUT_DIR/rank{r}.pt.

Cases: {"kind": "vae", "video", "seed", "kl_weight", "checkpointing"}: encode -> sample -> decode,
L2 (mean over the clip) + kl_weight · KL; {"kind": "convs", "x", "weight", "counts", "state"}: two
causal convs with a SiLU between them on frame slices of the given sizes (any split: ranks with
fewer frames than a conv's history), loss Σ y · weight (+ 1.5 · a parameter on rank 0 only); {"kind": "bad_split", "video", "latents",
"video_bounds", "latent_bounds"}: encode_local / decode_local given other slices than local_frames makes (the errors)."""
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cogvx.models.vae import CausalVAE
from cogvx.parallel import vae as cp
from cogvx_kernels.nn import CausalConv3d

folder, in_file, out_dir = sys.argv[1:4]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}
for name, case in torch.load(in_file).items():
    if case["kind"] == "vae":
        vae = CausalVAE.from_pretrained(folder).enable_gradient_checkpointing(case["checkpointing"])
        video = cp.local_frames(case["video"], ratio=int(vae.config.temporal_compression_ratio))
        video = video.clone().requires_grad_()
        posterior = cp.encode_local(vae, video)
        z = cp.sample_local(posterior, torch.Generator().manual_seed(case["seed"]))
        reconstruction = cp.decode_local(vae, z)
        loss = cp.frame_share(video) * F.mse_loss(reconstruction, video) + case["kl_weight"] * posterior.kl().mean()
        model = vae
    elif case["kind"] == "bad_split":
        vae = CausalVAE.from_pretrained(folder)
        (start, end), (first, last), errors = case["video_bounds"][rank], case["latent_bounds"][rank], {}
        for what, call in (("encode", lambda: cp.encode_local(vae, case["video"][:, :, start:end])),
                           ("decode", lambda: cp.decode_local(vae, case["latents"][:, :, first:last]))):
            try:
                call()
            except ValueError as e:
                errors[what] = str(e)
        results[name] = errors
        continue
    else:
        model = torch.nn.Module()  # two convs, a parameter only rank 0's loss uses, one no loss uses
        model.convs = torch.nn.ModuleList([CausalConv3d(4, 4, 3), CausalConv3d(4, 4, (2, 3, 3))])
        model.convs.load_state_dict(case["state"])
        model.rank0_only, model.unused = (torch.nn.Parameter(torch.ones(())) for _ in range(2))
        start = sum(case["counts"][:rank])
        end = start + case["counts"][rank]
        video = case["x"][:, :, start:end].clone().requires_grad_()
        ctx = cp.ContextParallel()
        y = ctx.conv(model.convs[1], F.silu(ctx.conv(model.convs[0], video)))
        loss = (y * case["weight"][:, :, start:end]).sum() + (1.5 * model.rank0_only if rank == 0 else 0)
    loss.backward()
    cp.sum_gradients(model)
    results[name] = dict(loss=loss.detach(), video_grad=video.grad,
                         grads={n: p.grad for n, p in model.named_parameters()})
torch.save(results, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()
