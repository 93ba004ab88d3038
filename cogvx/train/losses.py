"""Training losses. The VAE's: reconstruction, KL, LPIPS, a 3D PatchGAN discriminator and its losses,
LDM's adaptive GAN weight and the R1 gradient penalty. The transformer's: `v_prediction_loss` (at
the end of this file).

Videos are (B, C, F, H, W). The trainer combines the terms (LDM's LPIPSWithDiscriminator, one term
at a time so each can be logged):

    rec   = reconstruction_loss(x, x_rec) + w_lpips · lpips(x, x_rec)
    g     = generator_loss(D(x_rec), kind)
    λ     = adaptive_weight(rec, g, vae.decoder.conv_out.conv.weight, max_weight)   # the decoder's last layer
    loss  = rec + w_kl · kl_loss(posterior) + w_gan · λ · g            (g only after the GAN start step)
    d     = discriminator_loss(D(x), D(x_rec.detach()), kind) + w_gp · gradient_penalty(D, x)

The trainer takes loss's gradient with each head (LPIPS, the discriminator) back-propagated once:
`reconstruction_gradient` (L2 + LPIPS), `output_gradient`, `last_layer_gradient`, `weight_from_gradients`.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["reconstruction_loss", "kl_loss", "LPIPS", "Discriminator3D", "discriminator_loss",
           "generator_loss", "adaptive_weight", "weight_from_gradients", "output_gradient", "reconstruction_gradient",
           "last_layer_gradient",
           "gradient_penalty", "velocity", "v_prediction_loss"]

GAN_KINDS = ("hinge", "non_saturating")


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """mean((x − x_rec)²) for "l2", mean(|x − x_rec|) for "l1", over every element (in fp32)."""
    if x.shape != x_rec.shape:
        raise ValueError(f"x and x_rec must have the same shape; got {tuple(x.shape)} and {tuple(x_rec.shape)}")
    x, x_rec = x.float(), x_rec.float()  # fp32 means for a bf16 decoder output
    if kind == "l2":
        return F.mse_loss(x_rec, x)
    if kind == "l1":
        return F.l1_loss(x_rec, x)
    raise ValueError(f"reconstruction kind must be 'l2' or 'l1'; got {kind!r}")


def kl_loss(posterior) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = 0.5·Σ(μ² + σ² − 1 − log σ²), summed over (C, T, H, W), mean over the
    batch (as LDM). `posterior` has `.mean` and `.logvar` (cogvx's DiagonalGaussian: logvar clamped)."""
    mean, logvar = posterior.mean, posterior.logvar
    return (0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).sum(1).mean()


# torchvision's vgg16 `features` indices in each of lpips' five slices (lpips.pretrained_networks.vgg16).
VGG_SLICES = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
VGG_FILE_HELP = ("torchvision's ImageNet vgg16 state dict (vgg16-397923af.pth, keys features.N.weight/bias; "
                 "torchvision keeps it in ~/.cache/torch/hub/checkpoints/)")


def vgg_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """torchvision's vgg16 state dict in `path`, renamed for lpips: features.N.* -> net.slice{k}.N.*
    (the classifier's keys are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS backbone file {path} does not exist: it must be {VGG_FILE_HELP}")
    try:
        try:  # a zip-format file, memory-mapped: only the features' tensors are read (the copies below)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy-format file (torchvision's own, from 2017) is read whole
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"LPIPS backbone file {path} cannot be read by torch.load(weights_only=True) "
                         f"({type(e).__name__}, chained above): it must be {VGG_FILE_HELP}") from e
    if not isinstance(state, dict):
        raise ValueError(f"LPIPS backbone file {path} holds a {type(state).__name__}, not a state dict: "
                         f"it must be {VGG_FILE_HELP}")
    renamed = {}
    for k, layers in VGG_SLICES.items():
        for n in layers:
            for p in ("weight", "bias"):
                if f"features.{n}.{p}" in state:
                    renamed[f"net.slice{k}.{n}.{p}"] = state[f"features.{n}.{p}"].clone()
    return renamed


def _linear_heads() -> dict[str, torch.Tensor]:
    """lpips' v0.1 linear heads for VGG (lin0..lin4), from the file inside its wheel, where
    lpips.LPIPS(pretrained=True) reads them."""
    import lpips
    return torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                      weights_only=True)


def _random_trunk() -> dict[str, torch.Tensor]:
    """vgg16's features as torchvision initialises them (Kaiming normal, fan-out, zero biases), drawn
    from the global torch RNG, named as `vgg_backbone_state` names a file's."""
    from torchvision.models.vgg import cfgs
    state, in_channels, n = {}, 3, 0
    for v in cfgs["D"]:  # vgg16: a 3×3 conv + ReLU per channel count, "M" a max-pool
        if v != "M":
            weight = nn.init.kaiming_normal_(torch.empty(v, in_channels, 3, 3), mode="fan_out", nonlinearity="relu")
            slice_ = next(k for k, layers in VGG_SLICES.items() if n in layers)
            state |= {f"net.slice{slice_}.{n}.weight": weight, f"net.slice{slice_}.{n}.bias": torch.zeros(v)}
            in_channels, n = v, n + 2
        else:
            n += 1
    return state


class LPIPS(nn.Module):
    """LPIPS (the `lpips` package, VGG16 trunk, its v0.1 linear heads) over videos: frames as a batch,
    mean over frames and batch. Frozen: no parameter takes gradients and it stays in eval mode, but
    gradients flow to the inputs.

    `backbone` is a file with torchvision's vgg16 state dict (lpips would download it; these machines
    cannot) or "random" (the trunk as torchvision initialises it, drawn from the global torch RNG:
    for tests and benchmarks only). `.backbone_name` records which, for the log."""

    def __init__(self, backbone: str | Path):
        super().__init__()
        import lpips
        trunk = _random_trunk() if str(backbone) == "random" else vgg_backbone_state(backbone)  # a bad file fails first
        # Built on the meta device, then given its weights: lpips builds torchvision's whole vgg16 and keeps
        # its features, so on a real device its 124 M-parameter classifier would be initialised and dropped.
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", UserWarning)  # lpips calls torchvision's deprecated vgg16(pretrained=False)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
        self.lpips.scaling_layer = lpips.ScalingLayer()  # its constant buffers, made on the CPU
        expected = {k for k in self.lpips.state_dict() if k.startswith("net.")}
        if missing := sorted(expected - trunk.keys()):
            first = "features." + missing[0].split(".", 2)[2]  # net.slice1.0.weight -> features.0.weight
            raise ValueError(f"LPIPS backbone file {backbone} lacks {len(missing)} of vgg16's feature "
                             f"weights (e.g. {first}): it must be {VGG_FILE_HELP}")
        try:
            self.lpips.load_state_dict({**_linear_heads(), **trunk}, strict=False, assign=True)
        except RuntimeError as e:
            raise ValueError(f"LPIPS backbone file {backbone} does not fit vgg16 ({e}): "
                             f"it must be {VGG_FILE_HELP}") from e
        if unset := [k for k, t in self.lpips.state_dict().items() if t.is_meta]:
            raise RuntimeError(f"this lpips version has tensors LPIPS does not load ({', '.join(unset)})")
        self.backbone_name = str(backbone)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval: the heads' dropout stays off inside a training model

    @staticmethod
    def _check(x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape != y.shape or x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"LPIPS takes two (B, 3, F, H, W) videos of one shape; got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"LPIPS needs frames of at least 16×16 pixels; got {x.shape[-2]}×{x.shape[-1]}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, F, H, W) in [-1, 1], H and W at least 16 (VGG's four poolings) -> scalar."""
        self._check(x, y)
        return self.lpips(_frames(x), _frames(y)).float().mean()  # fp32 mean under bf16 autocast

    def value_and_gradient(self, x: torch.Tensor, y: torch.Tensor, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lpips(x, y), ∂lpips/∂y) on equal chunks of frames of at most `max_pixels` pixels together
        (at least one frame; 0: all frames at once): LPIPS is a mean over frames, so only one chunk's VGG
        activations are held at a time (their graph is the largest of a VAE training step's on long
        or large clips). The same value and gradient, summed in another order. y's graph is not
        touched: the gradient is for the caller's backward."""
        if max_pixels < 0:
            raise ValueError(f"max_pixels must be >= 0 (0: all frames at once); got {max_pixels}")
        self._check(x, y)
        x_frames, y_frames = _frames(x.detach()), _frames(y.detach())
        count = x_frames.shape[0]
        chunks = -(-count * x.shape[-2] * x.shape[-1] // max_pixels) if max_pixels else 1
        chunk = -(-count // min(chunks, count))  # equal chunks (the last one shorter)
        value, grad = torch.zeros((), device=y.device), torch.empty_like(y_frames)
        for start in range(0, count, chunk):
            piece = y_frames[start:start + chunk].requires_grad_()
            with torch.enable_grad():
                loss = self.lpips(x_frames[start:start + chunk], piece).float().sum() / count
                grad[start:start + chunk] = torch.autograd.grad(loss, piece)[0]
            value += loss.detach()
        return value, grad.unflatten(0, (y.shape[0], y.shape[2])).transpose(1, 2)


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B·F, C, H, W)."""
    return video.transpose(1, 2).flatten(0, 1)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, so that a patch's logit depends only on the frames in its
    receptive field (and a 1-frame clip is normalised as an image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        return super().forward(frames).reshape(b, t, c, h, w).transpose(1, 2)


class Discriminator3D(nn.Module):
    """A 3D PatchGAN over (T, H, W): LDM's NLayerDiscriminator (pix2pix) with Conv3d.

    Layers: conv(in -> channels) + LeakyReLU(0.2); `layers` − 1 convs doubling the channels (at most
    8·channels) + norm + LeakyReLU; one more at stride 1; a final conv to 1 logit per patch. Every
    conv has kernel (3, 4, 4), padding (1, 1, 1), stride (1, 2, 2) for the first `layers` and
    (1, 1, 1) for the last two: time is never downsampled (any frame count works, a 1-frame clip is
    an image) and each logit sees 2·(layers + 2) + 1 frames (11 for layers=3), height and width
    shrink by 2^layers then by 2 (so they must be at least 3·2^layers: 24 for layers=3). The norm is
    GroupNorm per frame ("group") or none ("none"): no BatchNorm (it mixes samples, which DDP and the
    gradient penalty do not expect). Weights N(0, 0.02) as LDM's init.

    (B, in_channels, F, H, W) -> logits (B, 1, F, ⌊H / 2^layers⌋ − 2, ⌊W / 2^layers⌋ − 2)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "group"):
        super().__init__()
        if in_channels < 1 or channels < 1 or layers < 1:
            raise ValueError(f"in_channels, channels and layers must be positive; got {in_channels}, {channels}, {layers}")
        if norm not in ("group", "none"):
            raise ValueError(f"norm must be 'group' or 'none'; got {norm!r}")
        self.in_channels, self.layers = in_channels, layers
        widths = [in_channels] + [channels * min(2 ** i, 8) for i in range(layers + 1)]
        blocks = []
        for i in range(layers + 1):
            stride = (1, 2, 2) if i < layers else (1, 1, 1)
            normed = i > 0 and norm == "group"
            blocks += [nn.Conv3d(widths[i], widths[i + 1], (3, 4, 4), stride, 1, bias=not normed)]
            if normed:
                blocks += [FrameGroupNorm(math.gcd(32, widths[i + 1]), widths[i + 1])]
            blocks += [nn.LeakyReLU(0.2)]
        blocks += [nn.Conv3d(widths[-1], 1, (3, 4, 4), 1, 1)]
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def min_size(self) -> int:
        return 3 * 2 ** self.layers

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dim() != 5 or video.shape[1] != self.in_channels:
            raise ValueError(f"the discriminator takes (B, {self.in_channels}, F, H, W) videos; got {tuple(video.shape)}")
        if min(video.shape[-2:]) < self.min_size:
            raise ValueError(f"the discriminator with {self.layers} layers needs frames of at least "
                             f"{self.min_size}×{self.min_size}; got {video.shape[-2]}×{video.shape[-1]}")
        return self.net(video)


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"GAN loss kind must be one of {GAN_KINDS}; got {kind!r}")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge:          0.5·(mean(relu(1 − D(x))) + mean(relu(1 + D(x̂))))
    non_saturating: 0.5·(mean(softplus(−D(x))) + mean(softplus(D(x̂))))
    (the 0.5 as LDM's hinge_d_loss / vanilla_d_loss)."""
    _check_kind(kind)
    real_logits, fake_logits = real_logits.float(), fake_logits.float()  # fp32 means under autocast
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge: −mean(D(x̂)) (LDM); non_saturating: mean(softplus(−D(x̂)))."""
    _check_kind(kind)
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float) -> torch.Tensor:
    """LDM's calculate_adaptive_weight: ‖∇_w rec‖ / (‖∇_w gan‖ + 1e-4) at the last layer's weight w
    (the decoder's `conv_out.conv.weight`), clamped to [0, max_weight], detached. The graph is kept
    (retain_graph) for the backward of the total loss; the GAN weight from the config multiplies it
    outside (LDM's discriminator_weight). LDM's way, which back-propagates each loss's head (LPIPS, the
    discriminator) here and again in the total loss's backward; the trainer takes `output_gradient` and
    `last_layer_gradient` instead, which give the same weight with one backward of each head."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return weight_from_gradients(g_rec, g_gan, max_weight)


def weight_from_gradients(g_rec: torch.Tensor, g_gan: torch.Tensor, max_weight: float) -> torch.Tensor:
    """The adaptive weight from the last layer's two gradients: ‖g_rec‖ / (‖g_gan‖ + 1e-4), clamped to
    [0, max_weight], detached (norms in fp32)."""
    if max_weight < 0:
        raise ValueError(f"max_weight must be >= 0; got {max_weight}")
    weight = g_rec.detach().float().norm() / (g_gan.detach().float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight)


def output_gradient(loss: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """∂loss/∂output: the backward of the loss's head only (LPIPS, the discriminator: whatever lies
    between the model's output and the loss), whose graph is freed here. The model's own backward
    then starts from the sum of its heads' output gradients (`torch.autograd.backward(output, grad)`),
    which runs each head's backward once where `adaptive_weight` + `loss.backward()` run it twice."""
    return torch.autograd.grad(loss, output)[0]


def reconstruction_gradient(x: torch.Tensor, x_rec: torch.Tensor, lpips: "LPIPS | None", *, kind: str = "l2",
                            weight: float = 1.0, lpips_weight: float = 0.0, lpips_chunk_pixels: int = 0,
                            share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VAE loss's reconstruction head back-propagated once to x_rec: (share · rec, share · LPIPS,
    ∂(weight · share · rec + lpips_weight · share · LPIPS)/∂x_rec), LPIPS on chunks of frames of at most
    `lpips_chunk_pixels` pixels (`LPIPS.value_and_gradient`; `lpips` None: no LPIPS term, a zero).
    `share`: this rank's part of a loss the ranks split (context parallelism), else 1."""
    rec_loss = share * reconstruction_loss(x, x_rec.float(), kind)
    grad = output_gradient(weight * rec_loss, x_rec)
    lp = x_rec.new_zeros(())
    if lpips is not None:  # a few frames at a time: LPIPS's VGG graph is a step's largest
        lp, grad_lp = lpips.value_and_gradient(x, x_rec.float(), lpips_chunk_pixels)
        lp = share * lp
        grad += (share * lpips_weight) * grad_lp.to(grad.dtype)
    return rec_loss, lp, grad


def last_layer_gradient(output: torch.Tensor, grad_output: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """∇_w of a loss whose gradient at `output` is grad_output, w = `last_layer` (the weight of the
    layer that makes `output`): a backward through that layer only; the model's graph is kept."""
    return torch.autograd.grad(output, last_layer, grad_output, retain_graph=True)[0]


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of ‖∇_x Σ D(x)‖² at the real clips, the
    squared norm over all of a sample's elements. Differentiable (create_graph) for the
    discriminator's backward; `real` itself is not modified (a detached copy takes the gradient)."""
    real = real.detach().requires_grad_(True)
    logits = discriminator(real)
    (grad,) = torch.autograd.grad(logits.sum(), real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


# -- the transformer's diffusion loss --------------------------------------------------------------------
def _at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample, shaped to broadcast over `like` (B, ...), in fp32."""
    alphas = alphas_cumprod.to(like.device)[timesteps.to(like.device)].float()
    return alphas.reshape(-1, *([1] * (like.dim() - 1)))


def velocity(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0 (fp32), with ᾱ from a scheduler's
    `alphas_cumprod` table (its SNR shift and zero-terminal-SNR rescale included)."""
    alphas = _at(alphas_cumprod, timesteps, latents)
    return alphas.sqrt() * noise.float() - (1 - alphas).sqrt() * latents.float()


def v_prediction_loss(prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """mean((v_pred − v)²) over every element (fp32): the model saw x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε
    at timesteps (B,) and predicted v. This is diffusers' CogVideoX trainer's loss: it turns v_pred into
    x0_pred = sqrt(ᾱ)·x_t − sqrt(1 − ᾱ)·v_pred and weights (x0_pred − x0)² by 1/(1 − ᾱ); since
    x0_pred − x0 = −sqrt(1 − ᾱ)·(v_pred − v), the weight cancels exactly."""
    if prediction.shape != latents.shape or noise.shape != latents.shape:
        raise ValueError(f"prediction, latents and noise must have one shape; got {tuple(prediction.shape)}, "
                         f"{tuple(latents.shape)}, {tuple(noise.shape)}")
    if timesteps.shape != (latents.shape[0],):
        raise ValueError(f"timesteps must be ({latents.shape[0]},), one per sample; got {tuple(timesteps.shape)}")
    return F.mse_loss(prediction.float(), velocity(latents, noise, timesteps, alphas_cumprod))
