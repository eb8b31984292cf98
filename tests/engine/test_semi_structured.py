"""2:4 layers in semi-structured form: a conv run as a GEMM over channels-last patches computes
what the conv does, its weight matrix keeps N:M groups consecutive, and the sparse conversion
says where it cannot run (a CPU) or which layers it leaves dense, and why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoprune.cost.semi_structured import GemmConv2d, check_semi_structured, gemm_unfit, semi_structured
from autoprune.errors import AutopruneError
from autoprune.prune.patterns import NM, nm_mask, violations


@pytest.mark.parametrize("kernel,stride,padding,bias", [
    (3, 1, 1, False), (3, 2, 1, True), (1, 1, 0, False), (1, 2, 0, True), (5, 1, 2, True), (3, 1, 0, False),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_conv_computes_what_the_conv_does(kernel, stride, padding, bias, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, kernel, stride, padding, bias=bias).eval()
    x = torch.randn(3, 8, 11, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gemm = GemmConv2d(conv)
    with torch.no_grad():
        want, got = conv(x), gemm(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_weight_matrix_keeps_nm_groups_consecutive():
    """A 2:4 mask over input channels stays 2:4 along the GEMM's reduction (kh, kw, in), which is
    what the sparse kernels read; the conv's own (in, kh, kw) order would break it."""
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight.abs(), NM(2, 4)))
    matrix = GemmConv2d(conv).weight
    assert matrix.shape == (32, 9 * 16)
    assert violations(matrix, "2:4") == 0
    assert (matrix != 0).sum() == matrix.numel() // 2
    assert violations(conv.weight.detach().reshape(32, -1), "2:4") > 0  # the conv's layout is not the kernels'


def test_layers_that_cannot_run_as_a_gemm_are_named_with_the_reason():
    assert gemm_unfit(nn.Conv2d(8, 8, 3, groups=8)) == "groups=8"
    assert gemm_unfit(nn.Conv2d(8, 8, 3, dilation=2)) == "dilation=(2, 2)"
    assert "reflect" in gemm_unfit(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    assert gemm_unfit(nn.Conv2d(8, 8, 3, padding=1)) is None
    with pytest.raises(AutopruneError, match="groups=8"):
        GemmConv2d(nn.Conv2d(8, 8, 3, groups=8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_semi_structured_refuses_a_cpu_in_one_line():
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    with pytest.raises(AutopruneError, match="need a CUDA GPU") as err:
        semi_structured(model, "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(AutopruneError, match="no CUDA GPU"):
        semi_structured(model, "cuda")


def _masked_net() -> tuple[nn.Module, torch.Tensor]:
    """Convs and a linear layer wide enough for the sparse kernels, cut to 2:4, 1:4 and 4:8."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
                        nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 64, 3, stride=2, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128))
    with torch.no_grad():
        for index, rung in ((0, NM(2, 4)), (3, NM(1, 4)), (5, NM(4, 8)), (8, NM(2, 4))):
            net[index].weight.mul_(nm_mask(net[index].weight.abs(), rung))
    return net.eval(), torch.randn(64, 64, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need a CUDA GPU of compute capability 8.0 or later")
def test_semi_structured_converts_the_two_of_four_layers_and_keeps_the_outputs():
    net, x = _masked_net()
    sparse, report = semi_structured(net, "cuda")
    by_name = {r.name: r for r in report}
    assert by_name["0"].converted and by_name["3"].converted and by_name["8"].converted  # 2:4, and 1:4 within it
    assert not by_name["5"].converted and "keep more than 2" in by_name["5"].why  # 4:8 is not 2:4
    assert isinstance(sparse[0], GemmConv2d) and isinstance(net[0], nn.Conv2d)  # the input model unchanged
    assert check_semi_structured(net, sparse, x) < 2e-2  # bfloat16 against bfloat16


def test_the_dense_gemm_twin_picks_the_two_of_four_layers_and_computes_the_same():
    """``sparse=False``, which runs anywhere, takes the layers the sparse conversion would and
    leaves the others with their reason; its outputs are the masked model's."""
    net, x = _masked_net()
    gemm, report = semi_structured(net, "cpu", torch.float32, sparse=False)
    by_name = {r.name: r for r in report}
    assert [r.name for r in report if r.converted] == ["0", "3", "8"]  # 2:4, 1:4 (within 2:4), linear 2:4
    assert "keep more than 2" in by_name["5"].why  # 4:8
    assert isinstance(gemm[0], GemmConv2d) and isinstance(gemm[5], nn.Conv2d) and isinstance(net[0], nn.Conv2d)
    assert by_name["0"].to_dict() == {"layer": "0", "matrix": [128, 9 * 64], "converted": True}
    assert check_semi_structured(net, gemm, x[:4]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need a CUDA GPU of compute capability 8.0 or later")
def test_the_semi_structured_runtime_times_a_two_of_four_model_against_its_dense_twin():
    from autoprune.cost.latency import measure_ratio

    net, _ = _masked_net()
    dense, _ = _masked_net()
    dense.load_state_dict({k: torch.randn_like(v) if v.dim() > 1 else v for k, v in dense.state_dict().items()})
    ratio, d, p = measure_ratio(dense, net, (64, 16, 16), "cuda", 64, 1, pairs=5, runtime="semi-structured")
    assert 0 < ratio < 10 and d.median_s > 0 and p.median_s > 0
