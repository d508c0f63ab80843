"""NF4 weights dequantized by one kernel per weight inside the compiled decoder layers.

bitsandbytes dequantizes a double-quantized NF4 weight in three steps: the 8-bit absmaxes, then
their offset added, then the 4-bit codes. On the H200 that took 76 us for a 14,336 x 4,096 weight
(a bf16 copy of it: 55 us), 40 us a call on average in training, 20 ms of a 600 ms Llama-3-8B step
at 4 x 2,048 tokens (benchmarks/README.md, 2026-11-30). `dequantize_nf4` does all three in one
Triton kernel on GPUs: each program reads a run of packed bytes, their absmax codes and the
second-level scales, and writes the weight once. On the CPU (and as the reference) it runs the
same arithmetic as torch ops. Written as torch ops inside the compiled graph instead, the
compiler's kernel took 280 us for that weight, so the dequantization is a custom op, opaque to it.

The dequantization runs under activation checkpointing, which makes the compiler compute it again
in backward (for the input's gradient) rather than keep the weight: left to itself, the compiler's
partitioner keeps any tensor a backward matmul reads, here a bf16 copy of every weight (13 GiB at
8B; seen on one layer on the CPU, tests/test_nf4.py). So backward keeps only the packed weight and
its quantization state, which the layer holds anyway, and dequantizes again, as bitsandbytes does.

Outside a compiled graph (generation, eager layers) the layer runs bitsandbytes' own forward.
"""

import functools

import torch
import torch.utils.checkpoint


@torch.library.custom_op("qlora_loop::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    rows: int,
    columns: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The weight bitsandbytes packed, (rows, columns) in `dtype`: two 4-bit codes a byte (the first
    in the high nibble), each scaled by its block's absmax; with double quantization the absmaxes are
    themselves 8-bit codes scaled by a second-level absmax per `nested_blocksize`, plus their mean
    (`offset`). fp32 throughout, as bitsandbytes computes it, then rounded to `dtype` once: one
    Triton kernel on GPUs, the same arithmetic in torch ops elsewhere."""
    if packed.device.type == "cuda":
        out = torch.empty(rows, columns, device=packed.device, dtype=dtype)
        tensors = (packed, absmax, code, nested_absmax, nested_code, offset)
        launch_dequantize_kernel(*tensors, blocksize, nested_blocksize, out)
        return out
    if nested_absmax is not None:
        second_level = nested_absmax.repeat_interleave(nested_blocksize)[: absmax.numel()]
        absmax = nested_code[absmax.long()] * second_level + offset
    packed = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).long()
    values = code[codes].view(-1, blocksize) * absmax[:, None]
    return values.to(dtype).view(rows, columns)


@dequantize_nf4.register_fake
def _(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize, rows, columns, dtype):
    return packed.new_empty(rows, columns, dtype=dtype)


BYTES_PER_PROGRAM = 1024  # 2,048 weights a program


def launch_dequantize_kernel(
    packed, absmax, code, nested_absmax, nested_code, offset, blocksize: int, nested_blocksize: int, out: torch.Tensor
) -> None:
    nested = nested_absmax is not None
    count = packed.numel()
    grid = (-(-count // BYTES_PER_PROGRAM),)
    with torch.cuda.device(packed.device):  # Triton launches on the current GPU; device_map spreads the layers
        dequantize_kernel()[grid](
            packed.view(torch.uint8).reshape(-1),
            absmax,
            code,
            nested_absmax if nested else absmax,  # unread without double quantization
            nested_code if nested else code,
            offset if nested else code,
            out.view(-1),
            count,
            BYTES=BYTES_PER_PROGRAM,
            HALF_BLOCK=blocksize // 2,
            NESTED_BLOCK=nested_blocksize,
            NESTED=nested,
            enable_fp_fusion=False,  # the product and the offset's sum rounded apart, as bitsandbytes rounds them
        )


@functools.cache
def dequantize_kernel():
    """The Triton kernel, built on first use (Triton comes with CUDA builds of torch only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequantize_nf4_kernel(
        packed, absmax, code, nested_absmax, nested_code, offset, out, count,
        BYTES: tl.constexpr, HALF_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr, NESTED: tl.constexpr,
    ):  # fmt: skip
        index = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # of the packed bytes
        inside = index < count
        byte = tl.load(packed + index, mask=inside, other=0)
        block = index // HALF_BLOCK  # a block of weights takes HALF_BLOCK bytes
        if NESTED:
            scale_code = tl.load(absmax + block, mask=inside, other=0).to(tl.int32)
            scale = tl.load(nested_code + scale_code) * tl.load(nested_absmax + block // NESTED_BLOCK, mask=inside)
            scale = scale + tl.load(offset)
        else:
            scale = tl.load(absmax + block, mask=inside, other=0.0)
        high = tl.load(code + (byte >> 4).to(tl.int32)) * scale
        low = tl.load(code + (byte & 15).to(tl.int32)) * scale
        weights = tl.interleave(high, low)  # the high nibble is the first weight of the byte
        where = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out + where, weights.to(out.dtype.element_ty), mask=where < 2 * count)

    return dequantize_nf4_kernel


def kernel_reads(module: torch.nn.Module) -> bool:
    """A bitsandbytes Linear4bit whose weight `dequantize_nf4` reads exactly: NF4, packed in bytes,
    whole blocks."""
    import bitsandbytes as bnb

    if type(module) is not bnb.nn.Linear4bit or module.compute_dtype is None:
        return False
    state = getattr(module.weight, "quant_state", None)
    return (
        state is not None
        and state.quant_type == "nf4"
        and module.weight.dtype == torch.uint8
        and len(state.shape) == 2
        and state.shape.numel() % state.blocksize == 0
        and (not state.nested or state.state2.absmax.dtype == torch.float32)
    )


def compiled_4bit_forwards(model: torch.nn.Module) -> tuple[int, int]:
    """Give every 4-bit linear that `kernel_reads` the compiled forward below; returns (changed, left on
    bitsandbytes' own).

    The class is swapped, not each module's forward replaced, so that every decoder layer runs the
    same code and shares one compiled graph.
    """
    import bitsandbytes as bnb

    changed = kept = 0
    for module in model.modules():
        if kernel_reads(module):
            module.__class__ = nf4_linear_class()
            changed += 1
        elif type(module) is bnb.nn.Linear4bit:
            kept += 1
    return changed, kept


def count_in_graph(model: torch.nn.Module) -> int:
    """The 4-bit linears whose compiled forward dequantizes with `dequantize_nf4`."""
    return sum(type(module) is nf4_linear_class() for module in model.modules())


@functools.cache
def nf4_linear_class() -> type:
    """Linear4bit with the compiled forward (bitsandbytes is imported only when needed)."""
    import bitsandbytes as bnb

    class CompiledNF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit whose weight is dequantized by `dequantize_nf4` when compiled."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.compiler.is_compiling():
                return super().forward(x)
            state = self.weight.quant_state
            nested = state.state2 if state.nested else None
            weight = torch.utils.checkpoint.checkpoint(
                dequantize_nf4,
                self.weight,
                state.absmax,
                state.code,
                nested.absmax if nested else None,
                nested.code if nested else None,
                state.offset if nested else None,
                state.blocksize,
                nested.blocksize if nested else 0,
                *state.shape,
                state.dtype,
                use_reentrant=False,
                preserve_rng_state=False,  # nothing random in it: no RNG state kept per layer
            )
            product = torch.nn.functional.linear(x.to(self.compute_dtype), weight.to(self.compute_dtype))
            if self.bias is not None:
                product = product + self.bias.to(self.compute_dtype)
            return product.to(x.dtype)

    return CompiledNF4Linear
