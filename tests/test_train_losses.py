"""cogvx.train.losses: every loss term against numbers worked out by hand on small tensors; LPIPS
loading a torchvision-format vgg16 file equals lpips with the same trunk; the discriminator is 3D
with a bounded temporal receptive field; the adaptive weight on the VAE's last layer."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from cogvx.train.losses import (LPIPS, Discriminator3D, adaptive_weight, discriminator_loss, generator_loss,
                                gradient_penalty, kl_loss, last_layer_gradient, output_gradient, reconstruction_gradient,
                                reconstruction_loss, weight_from_gradients)

# ---------------------------------------------------------------- reconstruction and KL


def test_reconstruction_loss_by_hand():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 2, 2)
    x_rec = torch.tensor([1.0, 1.0, 0.0, 3.0]).reshape(1, 1, 1, 2, 2)
    # differences 1, 0, -2, 0
    assert reconstruction_loss(x, x_rec, "l2").item() == pytest.approx((1 + 0 + 4 + 0) / 4)
    assert reconstruction_loss(x, x_rec, "l1").item() == pytest.approx((1 + 0 + 2 + 0) / 4)
    assert reconstruction_loss(x, x_rec).item() == pytest.approx(1.25)  # l2 by default


def test_reconstruction_loss_bad_input():
    with pytest.raises(ValueError, match="kind must be 'l2' or 'l1'; got 'l3'"):
        reconstruction_loss(torch.zeros(2), torch.zeros(2), "l3")
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(torch.zeros(2), torch.zeros(3))


def tiny_posterior():
    from cogvx.models.vae import DiagonalGaussian
    # B=2, latent C=1, T=1, H=1, W=2; moments = [mean, logvar] along channels.
    mean = torch.tensor([[1.0, 0.0], [2.0, 0.0]]).reshape(2, 1, 1, 1, 2)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]]).reshape(2, 1, 1, 1, 2)
    return DiagonalGaussian(torch.cat([mean, logvar], 1)), torch.cat([mean, logvar], 1)


def test_kl_loss_by_hand():
    posterior, _ = tiny_posterior()
    # sample 0: μ=1, σ²=1 -> 0.5·(1 + 1 − 1 − 0) = 0.5;  μ=0, σ²=2 -> 0.5·(0 + 2 − 1 − ln 2)
    # sample 1: μ=2, σ²=1 -> 0.5·(4 + 1 − 1 − 0) = 2;    μ=0, σ²=1 -> 0
    per_sample = [0.5 + 0.5 * (1 - math.log(2.0)), 2.0]
    assert kl_loss(posterior).item() == pytest.approx(sum(per_sample) / 2)


def test_kl_loss_equals_posterior_kl_and_diffusers():
    from cogvx.models.vae import DiagonalGaussian
    diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.vae")
    moments = torch.randn(3, 8, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    ours = kl_loss(DiagonalGaussian(moments))
    torch.testing.assert_close(ours, DiagonalGaussian(moments).kl().mean())
    # diffusers' kl() sums over dims 1, 2, 3 only: for (B, C, T, H, W) the width is left to sum.
    ref = diffusers_vae.DiagonalGaussianDistribution(moments).kl()
    torch.testing.assert_close(ours, ref.sum(-1).mean())


# ---------------------------------------------------------------- GAN losses

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def softplus(z):
    return math.log(1.0 + math.exp(z))


def test_hinge_losses_by_hand():
    # relu(1 − real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2.5]
    d = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert d == pytest.approx(1.0)
    assert discriminator_loss(REAL, FAKE, "hinge").item() == pytest.approx(d)
    assert discriminator_loss(REAL, FAKE).item() == pytest.approx(d)  # hinge by default
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_non_saturating_losses_by_hand():
    d_real = (softplus(-2.0) + softplus(-0.5) + softplus(1.0)) / 3
    d_fake = (softplus(-2.0) + softplus(0.0) + softplus(1.5)) / 3
    assert discriminator_loss(REAL, FAKE, "non_saturating").item() == pytest.approx(0.5 * (d_real + d_fake))
    g = (softplus(2.0) + math.log(2.0) + softplus(-1.5)) / 3
    assert generator_loss(FAKE, "non_saturating").item() == pytest.approx(g)


def test_gan_losses_bad_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        discriminator_loss(REAL, FAKE, "wasserstein")
    with pytest.raises(ValueError, match="kind must be one of"):
        generator_loss(FAKE, "vanilla")


# ---------------------------------------------------------------- adaptive weight and gradient penalty


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.6, 0.8])
    rec, gan = (w * a).sum(), (w * b).sum()  # gradients a (norm 5) and b (norm 1)
    weight = adaptive_weight(rec, gan, w, max_weight=1e4)
    assert weight.item() == pytest.approx(5.0 / (1.0 + 1e-4))
    assert not weight.requires_grad
    assert adaptive_weight(rec, gan, w, max_weight=2.0).item() == 2.0
    # a quadratic reconstruction term: ∇ (w·w).sum() = 2w = [2, 4], norm √20
    assert adaptive_weight((w * w).sum(), gan, w, 1e4).item() == pytest.approx(math.sqrt(20.0) / (1.0 + 1e-4))
    # the graph is retained: the total loss can still be backpropagated
    (rec + weight * gan).backward()
    torch.testing.assert_close(w.grad, a + weight * b)


def test_adaptive_weight_on_the_vae_decoder():
    from cogvx.models.vae import CausalVAE
    torch.manual_seed(0)
    vae = CausalVAE(dict(block_out_channels=(32, 32, 64, 64), latent_channels=4, layers_per_block=1,
                         norm_num_groups=8), chunking="whole")
    disc = Discriminator3D(channels=8, layers=2)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1  # 9 frames -> 3 latents -> 9 frames
    x_rec = vae.decode(vae.encode(x).sample())
    rec, gan = reconstruction_loss(x, x_rec), generator_loss(disc(x_rec))
    weight = adaptive_weight(rec, gan, vae.decoder.conv_out.conv.weight, max_weight=1e4)
    assert torch.isfinite(weight) and weight > 0
    (rec + weight * gan).backward()
    assert vae.encoder.conv_in.conv.weight.grad.abs().sum() > 0


def test_heads_back_propagated_once_give_ldms_weight_and_gradients():
    """The trainer's step (each head's gradient at the reconstruction once, the adaptive weight from
    the last layer's gradients of those, one VAE backward from the reconstruction and the KL term)
    equals LDM's (adaptive_weight, then (nll + w_kl·KL + w_gan·λ·gan).backward()) in the weight and
    every VAE parameter's gradient, and runs LPIPS's and the discriminator's backward once each where
    LDM's runs them twice."""
    from cogvx.models.vae import CausalVAE
    torch.manual_seed(0)
    vae = CausalVAE(dict(block_out_channels=(16, 16, 32, 32), latent_channels=4, layers_per_block=1,
                         norm_num_groups=4), chunking="whole")
    disc, lpips = Discriminator3D(channels=8, layers=2).requires_grad_(False), LPIPS("random")
    x, noise = torch.rand(1, 3, 9, 32, 32) * 2 - 1, torch.randn(1, 4, 3, 4, 4)
    last = vae.decoder.conv_out.conv.weight
    backwards = {"lpips": 0, "disc": 0}
    for name, head in (("lpips", lpips.lpips.lin0), ("disc", disc.net[-1])):
        head.register_full_backward_hook(lambda *args, name=name: backwards.__setitem__(name, backwards[name] + 1))

    def terms():
        posterior = vae.encode(x)
        x_rec = vae.decode(posterior.mean + posterior.std * noise)
        nll = reconstruction_loss(x, x_rec) + 0.1 * lpips(x, x_rec)
        return x_rec, nll, generator_loss(disc(x_rec)), kl_loss(posterior)

    x_rec, nll, gan, kl = terms()
    ldm_weight = adaptive_weight(nll, gan, last, 1e4)
    (nll + 1e-6 * kl + 0.1 * ldm_weight * gan).backward()
    ldm = {n: p.grad.clone() for n, p in vae.named_parameters()}
    assert backwards == {"lpips": 2, "disc": 2}
    vae.zero_grad(set_to_none=True)
    backwards.update(lpips=0, disc=0)

    x_rec, nll, gan, kl = terms()
    grad_nll, grad_gan = output_gradient(nll, x_rec), output_gradient(gan, x_rec)
    weight = weight_from_gradients(last_layer_gradient(x_rec, grad_nll, last),
                                   last_layer_gradient(x_rec, grad_gan, last), 1e4)
    torch.autograd.backward((x_rec, 1e-6 * kl), (grad_nll + 0.1 * weight * grad_gan, None))
    assert backwards == {"lpips": 1, "disc": 1}
    torch.testing.assert_close(weight, ldm_weight, rtol=1e-5, atol=0)
    for n, p in vae.named_parameters():  # the same sums in another order: fp32 rounding
        torch.testing.assert_close(p.grad, ldm[n], rtol=1e-4, atol=1e-7, msg=n)


class Quadratic(nn.Module):
    """D(x) = s · Σ x² per sample: ∇ₓ = 2·s·x."""

    def __init__(self, s):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x):
        return self.s * x.pow(2).flatten(1).sum(1, keepdim=True)


def test_gradient_penalty_by_hand():
    real = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 1, 2, 2)
    d = Quadratic(1.5)
    # ‖2·s·x‖² = 4·s²·‖x‖²: 4·2.25·1 = 9 and 4·2.25·4 = 36, mean 22.5
    penalty = gradient_penalty(d, real)
    assert penalty.item() == pytest.approx(22.5)
    # differentiable in the discriminator's parameters: d/ds 4·s²·mean‖x‖² = 8·s·2.5 = 30
    penalty.backward()
    assert d.s.grad.item() == pytest.approx(30.0)
    assert not real.requires_grad and real.grad is None  # the caller's tensor is untouched


def test_gradient_penalty_linear_discriminator():
    w = torch.tensor([[1.0, 2.0], [2.0, 0.0]])  # ‖w‖² = 9
    linear = lambda x: (x * w).flatten(1).sum(1, keepdim=True)
    assert gradient_penalty(linear, torch.randn(3, 1, 1, 2, 2)).item() == pytest.approx(9.0)


# ---------------------------------------------------------------- discriminator


def test_discriminator_shapes_and_images():
    torch.manual_seed(0)
    disc = Discriminator3D(channels=8, layers=3)
    assert disc(torch.randn(2, 3, 5, 32, 40)).shape == (2, 1, 5, 2, 3)  # 32/8 − 2, 40/8 − 2
    assert disc(torch.randn(1, 3, 1, 24, 24)).shape == (1, 1, 1, 1, 1)  # a 1-frame clip (an image)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    with pytest.raises(ValueError, match="at least 24×24; got 16×32"):
        disc(torch.randn(1, 3, 1, 16, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        disc(torch.randn(1, 4, 1, 24, 24))
    with pytest.raises(ValueError, match="norm must be"):
        Discriminator3D(norm="batch")


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_is_3d(norm):
    """Changing frame 8 of 16 changes exactly the logits of frames 3..13: 5 convs of temporal kernel 3
    at stride 1 see 11 frames."""
    torch.manual_seed(0)
    disc = Discriminator3D(channels=8, layers=3, norm=norm).eval()
    x = torch.randn(1, 3, 16, 24, 24)
    y = x.clone()
    y[:, :, 8] = torch.randn(3, 24, 24)
    with torch.no_grad():
        changed = (disc(x) - disc(y)).abs().flatten(3).amax(-1)[0, 0]  # per output frame
    assert set(torch.nonzero(changed > 1e-7).flatten().tolist()) == set(range(3, 14))


def test_discriminator_gradient_penalty():
    torch.manual_seed(0)
    disc = Discriminator3D(channels=8, layers=2)
    penalty = gradient_penalty(disc, torch.randn(2, 3, 3, 16, 16))
    assert torch.isfinite(penalty) and penalty > 0
    penalty.backward()
    # every conv weight is trained by it (a bias after the last LeakyReLU cannot change ∇ₓD)
    weights = [p for name, p in disc.named_parameters() if name.endswith("weight")]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in weights)


def test_losses_are_fp32_under_bf16_autocast(random_lpips):
    torch.manual_seed(0)
    disc = Discriminator3D(channels=8)
    x = torch.rand(1, 3, 2, 24, 24) * 2 - 1
    y = (x + 0.1 * torch.randn_like(x)).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake, real = disc(y), disc(x)
        assert fake.dtype == torch.bfloat16
        terms = [reconstruction_loss(x, y, "l1"), random_lpips(x, y), generator_loss(fake),
                 discriminator_loss(real, fake, "non_saturating"), gradient_penalty(disc, x)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)
    sum(terms).backward()
    assert torch.isfinite(y.grad).all()


# ---------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A random vgg16 saved in torchvision's format (features.N.* and classifier.N.*)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(1)
    state = torchvision.models.vgg16(weights=None).state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path, state


def lpips_with_trunk(state):
    """lpips' own module, and the same with torchvision's vgg16 layers (built by torchvision from
    the state dict) copied into its slices module by module."""
    import warnings

    import lpips
    import torchvision
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16().features
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    random_trunk = copy.deepcopy(ref)
    for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in s.named_children():
            module.load_state_dict(features[int(name)].state_dict())
    return ref, random_trunk


def test_lpips_loads_a_torchvision_vgg16(vgg_file):
    path, state = vgg_file
    ours = LPIPS(path)
    assert ours.backbone_name == str(path)
    ref, random_trunk = lpips_with_trunk(state)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 2, 24, 24, generator=g) * 2 - 1, torch.rand(2, 3, 2, 24, 24, generator=g) * 2 - 1
    with torch.no_grad():
        per_frame = lambda model: torch.stack([model(x[:, :, f], y[:, :, f]).flatten() for f in range(2)])
        got = ours(x, y)
        assert got > 0
        torch.testing.assert_close(got, per_frame(ref).mean())
        assert (per_frame(random_trunk).mean() - got).abs() > 1e-4  # the file's trunk was used
    legacy = path.with_name("vgg16-legacy.pth")  # torchvision's own file predates the zip format: no mmap
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert LPIPS(legacy)(x, y) == got


def test_lpips_is_built_without_vggs_classifier():
    """lpips builds torchvision's whole vgg16 and keeps its features; ours is built on the meta
    device and given its weights, so no tensor larger than vgg16's largest feature conv (512·512·3·3)
    is ever made on the CPU (the classifier's first layer is 4096×25088). "random" draws the trunk as
    torchvision initialises it (Kaiming normal, fan-out; zero biases) from the global RNG; the linear
    heads are lpips' own."""
    import lpips
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(3)
    with LargestTensor() as largest:
        lp = LPIPS("random")
    assert largest.numel == 512 * 512 * 3 * 3
    assert not any(t.is_meta for t in [*lp.parameters(), *lp.buffers()])
    state = lp.lpips.state_dict()
    torch.manual_seed(3)
    first = torch.nn.init.kaiming_normal_(torch.empty(64, 3, 3, 3), mode="fan_out", nonlinearity="relu")
    torch.testing.assert_close(state["net.slice1.0.weight"], first, rtol=0, atol=0)
    assert not state["net.slice5.28.bias"].any()
    w = state["net.slice4.21.weight"]  # 512 -> 512: std sqrt(2 / fan_out) = sqrt(2 / (512·9))
    assert abs(w.std().item() / (2 / (512 * 9)) ** 0.5 - 1) < 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    for k, v in ref.state_dict().items():
        if not k.startswith("net."):  # the heads and the input scaling
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return LPIPS("random")


def test_lpips_is_frozen_zero_on_equal_inputs_and_passes_gradients(random_lpips):
    lp = random_lpips
    assert lp.backbone_name == "random"
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train()
    assert not lp.training and not lp.lpips.training
    x = (torch.rand(1, 3, 2, 16, 16) * 2 - 1).requires_grad_(True)
    assert lp(x, x.detach()).item() == 0.0
    y = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    lp(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.parameters())


@pytest.mark.parametrize("max_pixels", [0, 1, 4 * 16 * 24, 6 * 16 * 24 + 100, 10 ** 6])
def test_lpips_value_and_gradient_in_chunks_of_frames(random_lpips, max_pixels):
    """The trainer's LPIPS: value and gradient with respect to the reconstruction on chunks of frames
    (of B·F) of at most `max_pixels` pixels (at least one frame; 0: all at once) equal lpips(x, y)
    and its autograd gradient (fp32 rounding: another summation order, and oneDNN may pick another
    algorithm for another batch)."""
    x = torch.rand(2, 3, 3, 16, 24) * 2 - 1
    y = (torch.rand(2, 3, 3, 16, 24) * 2 - 1).requires_grad_(True)
    want = random_lpips(x, y)
    (want_grad,) = torch.autograd.grad(want, y)
    value, grad = random_lpips.value_and_gradient(x, y, max_pixels)
    assert not value.requires_grad and not grad.requires_grad and y.grad is None
    torch.testing.assert_close(value, want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())
    with pytest.raises(ValueError, match="max_pixels must be >= 0"):
        random_lpips.value_and_gradient(x, y, -1)


def test_lpips_backbone_file_errors(tmp_path, random_lpips):
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist: it must be torchvision's ImageNet vgg16"):
        LPIPS(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth cannot be read by torch.load.*vgg16-397923af\.pth"):
        LPIPS(tmp_path / "junk.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth lacks 25 of vgg16's feature weights \(e\.g\. features\.0\.bias\)"):
        LPIPS(tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"\(B, 3, F, H, W\)"):
        random_lpips(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 16×16 pixels; got 8×16"):
        random_lpips(torch.zeros(1, 3, 1, 8, 16), torch.zeros(1, 3, 1, 8, 16))


@pytest.mark.parametrize("with_lpips", [True, False])
def test_reconstruction_gradient_is_the_heads_autograd_gradient(random_lpips, with_lpips):
    """The trainer's reconstruction head (share · L2, share · LPIPS in chunks, and the gradient of
    their weighted sum at x_rec, back-propagated once) against autograd of the same sum."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 3, 16, 24, generator=g) * 2 - 1, torch.rand(2, 3, 3, 16, 24, generator=g) * 2 - 1
    y.requires_grad_(True)
    lpips = random_lpips if with_lpips else None
    rec, lp, grad = reconstruction_gradient(x, y, lpips, kind="l1", weight=0.7, lpips_weight=0.3,
                                            lpips_chunk_pixels=2 * 16 * 24, share=0.5)
    want_rec = 0.5 * reconstruction_loss(x, y, "l1")
    want_lp = 0.5 * random_lpips(x, y) if with_lpips else torch.zeros(())
    (want_grad,) = torch.autograd.grad(0.7 * want_rec + 0.3 * want_lp, y)
    torch.testing.assert_close(rec, want_rec.detach())
    torch.testing.assert_close(lp, want_lp.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())
    assert y.grad is None and not grad.requires_grad
