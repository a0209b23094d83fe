"""Quantized layers: int8 and int4 formats against reference arithmetic done here, the int4 nibble order, and
every CPU kernel against x times the dequantized weight (models/quantized.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.models.quantized import Int4Linear, Int8Linear, pack_int4, unpack_int4


def test_int8_matches_reference_quantization_and_error_bound():
    torch.manual_seed(0)
    linear = nn.Linear(96, 48, bias=True)
    weight = linear.weight.detach()
    scales = weight.abs().amax(dim=1) / 127  # symmetric, one scale per output channel
    reference = torch.round(weight / scales[:, None]).clamp(-127, 127)
    layer = Int8Linear.from_linear(linear)
    assert layer.qweight.dtype == torch.int8 and torch.equal(layer.qweight.float(), reference)
    torch.testing.assert_close(layer.dequantize(), reference * scales[:, None], rtol=0, atol=1e-7)
    # Rounding to the nearest step: no weight moves more than half a step of its row.
    assert ((layer.dequantize() - weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    torch.testing.assert_close(layer.bias, linear.bias.detach())


def test_int4_matches_reference_quantization_and_error_bound():
    torch.manual_seed(0)
    linear = nn.Linear(128, 32, bias=False)
    group = 32
    weight = linear.weight.detach().view(32, 128 // group, group)
    minimum, maximum = weight.amin(-1), weight.amax(-1)
    scales = ((maximum - minimum) / 15).half().float()  # stored as float16, as is the offset
    offsets = minimum.half().float()
    values = torch.round((weight - offsets[..., None]) / scales[..., None]).clamp(0, 15)
    reference = (values * scales[..., None] + offsets[..., None]).view(32, 128)
    layer = Int4Linear.from_linear(linear, group)
    assert layer.qweight.shape == (32, 64) and layer.qweight.dtype == torch.uint8
    assert torch.equal(unpack_int4(layer.qweight).float(), values.view(32, 128))
    torch.testing.assert_close(layer.dequantize(), reference, rtol=0, atol=1e-6)
    # Half a step, plus what storing the scale and the offset in float16 moved the grid by.
    exact_scales = (maximum - minimum) / 15
    bound = scales / 2 + 15 * (scales - exact_scales).abs() + (offsets - minimum).abs() + 1e-6
    assert ((layer.dequantize().view_as(weight) - weight).abs() <= bound[..., None]).all()


def test_int4_packing_round_trip_and_nibble_order():
    values = torch.randint(0, 16, (5, 10), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(values)
    assert packed.shape == (5, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), values)
    # Column 2j in the low nibble, 2j + 1 in the high one.
    assert packed[2, 3].item() == values[2, 6].item() | (values[2, 7].item() << 4)


@pytest.mark.parametrize("make", [Int8Linear.from_linear, lambda linear: Int4Linear.from_linear(linear, 32)])
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_every_kernel_computes_x_times_the_dequantized_weight(make, rows):
    """1 and 8 rows go through the packed bf16 CPU kernels, 40 through dequantize + F.linear."""
    torch.manual_seed(0)
    layer = make(nn.Linear(64, 96, bias=True))
    x = torch.randn(rows, 64)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    # NOTE: the kernels round x and their output to bf16 (8 significant bits, 0.4% at worst per value);
    # 1% of the largest output leaves room for that and nothing like a wrong layout (errors of order 100%).
    assert (layer(x) - expected).abs().max() <= 0.01 * expected.abs().max()
    assert layer(x.view(rows, 1, 64)).shape == (rows, 1, 96)


def test_shapes_the_kernels_refuse_fall_back_to_float():
    torch.manual_seed(0)
    linear = nn.Linear(40, 24)  # 40 inputs: not a multiple of 16; 24 outputs: not a multiple of 16
    for layer in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 20)):
        assert not layer.use_kernel
        x = torch.randn(3, 40)
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias))
