"""The drop-in CausalConv3d module: diffusers' state-dict keys and numerics, chunked == whole."""
import pytest
import torch

from cogvx_kernels.nn import CausalConv3d


def test_state_dict_keys_and_parity_with_diffusers():
    diffusers_vae = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_cogvideox")
    torch.manual_seed(0)
    theirs = diffusers_vae.CogVideoXCausalConv3d(6, 8, 3, pad_mode="constant").eval()
    ours = CausalConv3d(6, 8, 3).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"conv.weight", "conv.bias"}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6, 5, 10, 12)
    cache_theirs = cache_ours = None
    for chunk in (x[:, :, :1], x[:, :, 1:3], x[:, :, 3:]):  # diffusers-style chunks with conv caches
        with torch.no_grad():
            y_theirs, cache_theirs = theirs(chunk, conv_cache=cache_theirs)
            y_ours, cache_ours = ours(chunk, cache_ours)
        torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache_ours, cache_theirs)


@pytest.mark.parametrize("update_cache", [False, True], ids=["new-cache", "cache-updated-in-place"])
@pytest.mark.parametrize("time_padding", ["first_frame", "zeros"])
@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1], [2, 3], [1, 4], [3, 2]])
@pytest.mark.parametrize("kt", [3, 4])
def test_chunked_equals_whole(time_padding, chunks, update_cache, kt):
    torch.manual_seed(0)
    conv = CausalConv3d(3, 4, (kt, 3, 3), time_padding=time_padding)
    x = torch.randn(1, 3, sum(chunks), 6, 7)
    with torch.no_grad():
        whole, whole_cache = conv(x)
        parts, cache, start = [], None, 0
        for n in chunks:
            previous = cache
            y, cache = conv(x[:, :, start:start + n], cache, update_cache=update_cache)
            assert (cache is previous) == (update_cache and previous is not None)
            parts.append(y)
            start += n
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, whole_cache, atol=0, rtol=0)


def test_in_place_cache_update_is_refused_under_autograd():
    conv = CausalConv3d(2, 2, 3)
    _, cache = conv(torch.randn(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="not under autograd"):
        conv(torch.randn(1, 2, 3, 4, 4, requires_grad=True), cache, update_cache=True)


def test_zeros_time_padding_is_zero_frames():
    conv = CausalConv3d(2, 3, 3, time_padding="zeros")
    x = torch.randn(1, 2, 2, 5, 5)
    y, _ = conv(x)
    ref = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 0)), conv.conv.weight,
                                     conv.conv.bias, padding=(0, 1, 1))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_cache_does_not_keep_the_chunk_alive():
    conv = CausalConv3d(2, 2, 3)
    _, cache = conv(torch.randn(1, 2, 6, 4, 4))
    assert cache.shape == (1, 2, 2, 4, 4)
    assert cache.untyped_storage().nbytes() == cache.numel() * cache.element_size()


def test_bad_arguments():
    with pytest.raises(ValueError, match="time_padding"):
        CausalConv3d(2, 2, 3, time_padding="replicate")
    with pytest.raises(ValueError, match="odd spatial"):
        CausalConv3d(2, 2, (3, 2, 2))
