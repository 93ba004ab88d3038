"""`python -m cogvx_kernels.demo`: a small tour of the ops on this machine.

Runs a CogVideoX-VAE-like causal convolution chunk by chunk with conv caches, checks it equals the
whole-video result and the reference, and times each available backend against the reference.
"""
from __future__ import annotations

import argparse
import time

import torch

import cogvx_kernels
from cogvx_kernels import _registry
from cogvx_kernels.nn import CausalConv3d
from cogvx_kernels.reference.causal_conv3d import causal_conv3d as reference


def _time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, nargs=2, default=(30, 45), metavar=("H", "W"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    conv = CausalConv3d(args.channels, args.channels, 3).to(device)
    video = torch.randn(1, args.channels, args.frames, *args.size, device=device)
    print(f"causal conv3d {args.channels}->{args.channels}, 3x3x3, video {tuple(video.shape)} on {device}")
    with torch.no_grad():
        whole, _ = conv(video)
        chunks, cache = [], None
        for start in range(0, args.frames, 2):  # 2-frame chunks with a conv cache, as a VAE decode
            y, cache = conv(video[:, :, start:start + 2], cache)
            chunks.append(y)
        streamed = torch.cat(chunks, dim=2)
        ref = reference(video, conv.conv.weight, conv.conv.bias)
    print(f"  streamed == whole: max diff {(streamed - whole).abs().max().item():.2e}")
    print(f"  vs reference:      max diff {(whole - ref).abs().max().item():.2e}")

    w, b = conv.conv.weight.detach(), conv.conv.bias.detach()
    t_ref = _time(lambda: reference(video, w, b))
    print(f"  {'reference':<10} {t_ref * 1e3:8.1f} ms")
    for backend in _registry.available("causal_conv3d", device):
        if backend == "reference" or (backend == "triton" and device.type == "cpu"):
            continue
        t = _time(lambda: cogvx_kernels.causal_conv3d(video, w, b, backend=backend))
        print(f"  {backend:<10} {t * 1e3:8.1f} ms  ({t_ref / t:.2f}x the reference)")


if __name__ == "__main__":
    main()
