"""NF4 weights dequantized by one kernel inside compiled layers (modules.nf4), against bitsandbytes."""

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from modules.nf4 import compiled_4bit_forwards, count_in_graph, dequantize_nf4, nf4_linear_class


def quantized(shape, dtype, nested: bool, quant_type: str = "nf4", device="cpu"):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(device, dtype)
    return F.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)


def arguments(packed, state) -> tuple:
    """dequantize_nf4's arguments for one quantized weight, its shape and dtype last."""
    nested = state.state2 if state.nested else None
    tensors = (nested.absmax, nested.code, state.offset) if nested else (None, None, None)
    blocks = (state.blocksize, nested.blocksize if nested else 0)
    return packed, state.absmax, state.code, *tensors, *blocks, *state.shape, state.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantized_weight_equals_bitsandbytes_bit_for_bit(dtype, nested):
    # 384 x 320 has 1,920 absmaxes: the last of the second-level blocks of 256 is partial.
    packed, state = quantized((384, 320), dtype, nested)
    expected = F.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(*arguments(packed, state)), expected)  # the custom op's CPU path


def nf4_linear(quant_type: str = "nf4", shape=(96, 128)) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type=quant_type)
    weight = torch.randn(shape)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=True)
    layer.weight._quantize("cpu")
    return layer


class GraphRecorder:
    """A torch.compile backend that keeps each graph's code (autograd functions' bodies included)."""

    def __init__(self):
        self.code = []

    def __call__(self, graph, inputs):
        self.code.append(graph.print_readable(print_output=False))
        return graph.forward


def test_compiled_layer_trains_as_bitsandbytes_does_with_no_bitsandbytes_op_in_its_graph():
    x = torch.randn(2, 7, 128, requires_grad=True)
    reference = nf4_linear()
    expected = reference(x)
    expected.square().sum().backward()
    expected_grad, x.grad = x.grad, None

    plain = GraphRecorder()
    torch.compile(nf4_linear(), backend=plain, fullgraph=True)(x)
    assert "ops.bitsandbytes" in "".join(plain.code)  # the recorder sees bitsandbytes' ops where they are

    layer = nf4_linear()
    assert compiled_4bit_forwards(layer) == (1, 0) and count_in_graph(layer) == 1
    assert torch.equal(layer(x), expected)  # eager: bitsandbytes' own forward
    recorder = GraphRecorder()
    output = torch.compile(layer, backend=recorder, fullgraph=True)(x)
    assert recorder.code and "ops.bitsandbytes" not in "".join(recorder.code)
    output.square().sum().backward()
    torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-6, atol=1e-6)

    x.grad = None
    inductor = torch.compile(layer)(x)  # the real compiler's kernels too
    inductor.square().sum().backward()
    torch.testing.assert_close(inductor, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1.0, 0.7])  # the compiler's default, and compiled layers' budget
def test_backward_keeps_the_packed_weight_and_nothing_larger(budget):
    torch._dynamo.reset()  # compile again under this budget
    layer = nf4_linear(shape=(96, 128))
    compiled_4bit_forwards(layer)
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    x = torch.randn(5, 128, requires_grad=True)
    with torch._functorch.config.patch(activation_memory_budget=budget):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            torch.compile(layer)(x).sum().backward()
    assert any(tensor is layer.weight or tensor.data_ptr() == layer.weight.data_ptr() for tensor in kept)
    sizes = [(tuple(tensor.shape), tensor.dtype) for tensor in kept]
    assert all(tensor.numel() <= layer.weight.numel() for tensor in kept), sizes  # no weight, no unpacked codes


def test_other_4bit_layouts_stay_on_bitsandbytes_forward():
    fp4 = nf4_linear(quant_type="fp4")
    assert compiled_4bit_forwards(fp4) == (0, 1) and type(fp4) is bnb.nn.Linear4bit
    odd = nf4_linear(shape=(3, 7))  # 21 weights: no whole block of 64
    assert compiled_4bit_forwards(odd) == (0, 1) and type(odd) is not nf4_linear_class()
