"""bench/conv_gemm.py: a convolution as one GEMM over an NHWC patch matrix must equal F.conv2d."""
import pytest
import torch
import torch.nn.functional as F

from bench.conv_gemm import GemmConv2d, conv2d_as_gemm, convs_as_gemm


@pytest.mark.parametrize("c,o,k,stride,padding,h,w", [
    (3, 5, 3, 1, 1, 7, 8),  # the UNet's 3x3 "same" convolution
    (4, 6, 3, 2, 1, 9, 9),  # strided downsampler, odd size
    (6, 4, 1, 1, 0, 5, 6),  # 1x1 shortcut
    (4, 4, 3, 2, 0, 8, 7),  # no padding
])
def test_conv2d_as_gemm_equals_conv2d(c, o, k, stride, padding, h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(o, c, k, k, generator=g), torch.randn(o, generator=g)
    ref = F.conv2d(x, weight, bias, stride, padding)
    out = conv2d_as_gemm(x, weight, bias, (stride, stride), (padding, padding))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_conv2d_as_gemm_rejects_channel_mismatch():
    with pytest.raises(ValueError, match="3 channels, weight expects 4"):
        conv2d_as_gemm(torch.zeros(1, 3, 4, 4), torch.zeros(2, 4, 3, 3), None, (1, 1), (1, 1))


def test_convs_as_gemm_threshold_selects_resolutions(monkeypatch):
    """Only inputs of at most max_pixels run as GEMMs; 0 turns it off; results match either way."""
    import bench.conv_gemm as conv_gemm

    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    net = torch.nn.Sequential(conv)
    small, large = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8)
    ref_small, ref_large = conv(small), conv(large)
    assert convs_as_gemm(net, max_pixels=16) == 1 and type(conv) is GemmConv2d
    calls = []
    monkeypatch.setattr(conv_gemm, "conv2d_as_gemm", lambda x, *a: calls.append(x.shape) or conv2d_as_gemm(x, *a))
    torch.testing.assert_close(net(small), ref_small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net(large), ref_large, rtol=1e-5, atol=1e-5)
    convs_as_gemm(net, 0)
    net(small)
    assert calls == [small.shape]
    assert conv.state_dict().keys() == {"weight", "bias"}
