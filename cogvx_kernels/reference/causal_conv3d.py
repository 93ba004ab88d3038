"""Causal 3D convolution in plain PyTorch: the ground truth the kernels are tested against.

It does what CogVideoX's VAE does: concatenate the halo (or the first frame repeated kt-1 times) in
front of the frames, then a stride-1 conv3d with zero spatial padding.
"""
import torch
import torch.nn.functional as F


def time_padded(x: torch.Tensor, kt: int, halo: torch.Tensor | None) -> torch.Tensor:
    """The kt-1 halo frames (or the first frame repeated) followed by x, along time."""
    if kt == 1:
        return x
    front = halo if halo is not None else x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
    return torch.cat([front, x], dim=2)


def causal_conv3d(x, weight, bias=None, halo=None, pad_h=None, pad_w=None):
    kt, kh, kw = weight.shape[2:]
    pad_h = kh // 2 if pad_h is None else pad_h
    pad_w = kw // 2 if pad_w is None else pad_w
    return F.conv3d(time_padded(x, kt, halo), weight, bias, padding=(0, pad_h, pad_w))
