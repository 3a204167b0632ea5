"""Linear layers packed for CPU inference, one class per weight format (`--weights`).

Every mode keeps activations, attention, the adapter math and the KV cache in float32; only the
matmul weights change format, and the quantized modes round each linear's input to bfloat16
(the dtype their kernels take). Measured on an AVX512-BF16/AMX Xeon, one thread, the 135M
default model's shapes (ms per product, fp32 → bf16 → int8 → int4):

| rows | 3072×576 (ffn up+gate)   | 49152×576 (output head)  |
|------|--------------------------|--------------------------|
| 1    | 0.39 → 0.21 → 0.16 → 0.14 | 9.5 → 5.5 → 4.1 → 2.1    |
| 32   | 1.13 → 0.32 → 2.24 → 1.92 | 24.6 → 8.0 → 48.7 → 33.1 |

So bf16 (oneDNN, weights reordered once into its blocked layout, AMX/AVX512-BF16 inside) wins
everywhere but batch 1, and the weight-only int8/int4 kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) win batch 1 and lose batched decode; fp32 through oneDNN is the
reference and the path the equivalence tests hold to. Weights that read the same input (q/k/v,
gate/up) are packed as one matrix so each step issues one larger product instead of several.

Inference only: a packed weight has no autograd, so training keeps the dense `nn.Linear`s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .weight_modes import GGUF_MODE, WEIGHT_CHOICES


# oneDNN reorders its weights for this many input rows, a typical decode batch; other row
# counts run on the same layout unchanged (measured: 1 to 512 rows keep the speed-up).
BATCH_HINT = 32
# int4 weights: one scale and one zero per this many input columns (what GGUF's Q4_0/Q4_1 use).
INT4_GROUP = 32


def packing_available(weight: torch.Tensor) -> bool:
    """CPU packing applies to float32 weights on a CPU build that has oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@dataclass
class Int4Weight:
    """A [N, K] weight as 4-bit codes in groups of INT4_GROUP input columns:
    w[n, k] = codes[n, k] · scales[n, k // G] + mins[n, k // G] (GGUF's Q4_1 form; Q4_0 is
    mins = −8 · scales)."""
    codes: torch.Tensor      # [N, K] int32 in 0..15
    scales: torch.Tensor     # [N, K // G] float32
    mins: torch.Tensor       # [N, K // G] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        groups = self.codes.float().view(n, -1, INT4_GROUP)
        return (groups * self.scales[..., None] + self.mins[..., None]).view(n, k)


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Asymmetric min/max quantization per group (GGUF's Q4_1 rule)."""
    n, k = w.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 weights need input sizes divisible by {INT4_GROUP}, got {k}")
    groups = w.float().view(n, -1, INT4_GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).clamp_min(1e-12)
    codes = ((groups - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return Int4Weight(codes.view(n, k), scales, lo)


class PackedLinear(nn.Module):
    """x @ [W_1; …; W_n]ᵀ with no bias → one tensor (n = 1) or the n outputs split back apart.
    Subclasses hold the concatenated weight in one format and implement `product`."""

    # The dtype the kernel takes and returns: inputs are rounded to it.
    dtype = torch.bfloat16

    def __init__(self, split_sizes: list[int]):
        super().__init__()
        self.split_sizes = split_sizes

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ in the kernel's output dtype (bfloat16 in every mode but fp32)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output(s) in float32."""
        return self._split(self.product(x).float())

    def native(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output(s) in the kernel's dtype, for a consumer that rounds them to it anyway (the
        next product's input): no conversion to float32 and back (measured at 512 prefill tokens:
        the MLP 32 → 19 ms per layer with gate/up kept in bf16)."""
        return self._split(self.product(x))

    def _split(self, y: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return y.split(self.split_sizes, dim=-1) if len(self.split_sizes) > 1 else y

    def extra_repr(self) -> str:
        return f"out_features={self.split_sizes}"


class OneDNNLinear(PackedLinear):
    """fp32 or bf16 weights in oneDNN's blocked layout (bf16: the input is rounded to bf16 and
    the product is accumulated in fp32 by oneDNN, returned in bf16)."""

    def __init__(self, weights: list[torch.Tensor], dtype: torch.dtype = torch.float32):
        super().__init__([w.shape[0] for w in weights])
        dense = torch.cat(weights) if len(weights) > 1 else weights[0]
        self.dtype = dtype
        # An opaque oneDNN tensor, held as a plain attribute: it is not state to save or move.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense.detach().to(dtype), BATCH_HINT)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")


class Int8Linear(PackedLinear):
    """Weight-only int8, one symmetric scale per output channel."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__([w.shape[0] for w in weights])
        dense = torch.cat([w.float() for w in weights])
        scales = (dense.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.weight = (dense / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scales = scales.to(torch.bfloat16)     # the kernel takes the input's dtype

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16),
                                               self.weight, self.scales)
        return y.view(*x.shape[:-1], -1)


class Int4Linear(PackedLinear):
    """Weight-only int4 in groups (Int4Weight), in the layout of torch's CPU int4 kernel."""

    def __init__(self, weights: list[Int4Weight]):
        super().__init__([w.shape[0] for w in weights])
        codes = torch.cat([w.codes for w in weights])
        scales = torch.cat([w.scales for w in weights])
        # The kernel computes (code − 8) · scale + zero.
        zeros = torch.cat([w.mins for w in weights]) + 8 * scales
        # It takes output sizes in multiples of 16: extra rows of zero weights, cut off after.
        self.n = codes.shape[0]
        pad = -self.n % 16
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            scales, zeros = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scales, zeros))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # [K // G, N, 2] (scale, zero) pairs, bf16: the kernel takes the input's dtype.
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()

    def product(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]).to(torch.bfloat16),
                                                       self.packed, INT4_GROUP, self.scales_and_zeros)
        return y[:, :self.n].reshape(*x.shape[:-1], -1)


def pack_linear(weights: list[torch.Tensor | Int4Weight], mode: str) -> PackedLinear:
    """The weights (same input size, concatenated along outputs) in `mode`'s format.

    In GGUF mode, 4-bit codes read from the file (Int4Weight) are served as they are; a group
    that has any other weight (GGUF Q8_0, F16, K-quants…, dequantized by the loader) is
    requantized to int8 per channel as a whole.
    """
    if mode == GGUF_MODE:
        if all(isinstance(w, Int4Weight) for w in weights):
            return Int4Linear(weights)
        mode = "int8"
    dense = [w.dequantize() if isinstance(w, Int4Weight) else w for w in weights]
    if mode == "fp32":
        return OneDNNLinear(dense)
    if mode == "bf16":
        return OneDNNLinear(dense, torch.bfloat16)
    if mode == "int8":
        return Int8Linear(dense)
    if mode == "int4":
        return Int4Linear([quantize_int4(w) for w in dense])
    raise ValueError(f"unknown weight mode {mode!r}; expected one of {', '.join(WEIGHT_CHOICES)}")

