"""Weight matrices as 32-value quantization blocks (pure numpy): recovery of a matrix's exact GGUF blocks
(Q4_1, Q8_0) from its de-quantized values, the affine 4-bit blocks of a matrix no block type holds (HQQ,
onnxruntime's implementation), and the dense-width MLP that makes a pruned down_proj split into the source's
blocks again. Shared by the GGUF writer (exporter/export/gguf.py) and the 4-bit ONNX format
(exporter/export/q4onnx.py).

A Q4_1 block stores w = d * q + m (d, m float16, q in 0..15); a Q8_0 block w = d * q (q in -127..127). A
matrix de-quantized from such a file (the embedded SmolLM2) gives its blocks back bit for bit: quantizing it
again with ggml's rounding finds the same d, m and q, and the check is that the blocks de-quantize to the
matrix exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # values per block of Q8_0, Q4_1 and the ONNX 4-bit blocks


def exact_blocks(data: np.ndarray, kind: str) -> tuple[np.ndarray, bool]:
    """`data` (rows, K) in the GGUF block type `kind` ("Q4_1", "Q8_0"): (the blocks' bytes, whether they
    de-quantize to `data` exactly). K must be a multiple of 32."""
    from gguf import GGMLQuantizationType, quants

    qtype = getattr(GGMLQuantizationType, kind)
    raw = quants.quantize(data, qtype)
    return raw, bool(np.array_equal(quants.dequantize(raw, qtype), data))


@dataclass(frozen=True)
class AffineBlocks:
    """4-bit blocks along the input dimension of a (rows, K) matrix: w = scale * q + offset per block."""

    scale: np.ndarray  # (rows, K / 32) float32
    offset: np.ndarray  # (rows, K / 32) float32
    q: np.ndarray  # (rows, K / 32, 32) uint8 in 0..15
    method: str  # "q4_1" (the source's own blocks) or "hqq"

    def dequantize(self) -> np.ndarray:
        """The (rows, K) float32 matrix the blocks hold, computed as ggml de-quantizes Q4_1."""
        w = self.scale[..., None] * self.q.astype(np.float32) + self.offset[..., None]
        return w.reshape(self.q.shape[0], -1)


@dataclass(frozen=True)
class Int8Blocks:
    """8-bit symmetric blocks (Q8_0): w = scale * q per block."""

    scale: np.ndarray  # (rows, K / 32) float32
    q: np.ndarray  # (rows, K / 32, 32) int8

    def dequantize(self) -> np.ndarray:
        return (self.scale[..., None] * self.q.astype(np.float32)).reshape(self.q.shape[0], -1)


def q4_1_blocks(data: np.ndarray) -> AffineBlocks | None:
    """The Q4_1 blocks that de-quantize to `data` (rows, K) exactly, or None when there are none (or K is not a
    multiple of 32)."""
    if data.ndim != 2 or data.shape[1] % BLOCK:
        return None
    raw, exact = exact_blocks(np.ascontiguousarray(data, dtype=np.float32), "Q4_1")
    if not exact:
        return None
    blocks = raw.reshape(data.shape[0], -1, 4 + BLOCK // 2)  # d (f16), m (f16), 16 bytes of nibbles
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., 4:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # ggml: value j low nibble, j + 16 high
    return AffineBlocks(d, m, q, "q4_1")


def q8_0_blocks(data: np.ndarray) -> Int8Blocks | None:
    """The Q8_0 blocks that de-quantize to `data` (rows, K) exactly, or None."""
    if data.ndim != 2 or data.shape[1] % BLOCK:
        return None
    raw, exact = exact_blocks(np.ascontiguousarray(data, dtype=np.float32), "Q8_0")
    if not exact:
        return None
    blocks = raw.reshape(data.shape[0], -1, 2 + BLOCK)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    return Int8Blocks(d, blocks[..., 2:].copy().view(np.int8))


def hqq_blocks(data: np.ndarray) -> AffineBlocks:
    """Affine 4-bit blocks of `data` (rows, K; K a multiple of 32) by HQQ (half-quadratic optimization of
    each block's zero point against the rounding error, no calibration data), onnxruntime's implementation."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    rows, k = data.shape
    quantizer = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4))
    q, scale, zero = quantizer.quantize_internal(torch.from_numpy(np.asarray(data, np.float32)), 4, group_size=BLOCK)
    # onnxruntime's form w = scale * (q - zero), zero a float: the offset is -scale * zero
    scale_np, zero_np = scale.numpy().astype(np.float32), zero.numpy().astype(np.float32)
    q_np = q.numpy().astype(np.uint8).reshape(rows, k // BLOCK, BLOCK)
    return AffineBlocks(scale_np, (-scale_np * zero_np).astype(np.float32), q_np, "hqq")


def rtn_blocks(data: np.ndarray) -> AffineBlocks:
    """Affine 4-bit blocks of `data` by round-to-nearest between each block's minimum and maximum (Q4_1's
    rule, float32 scale and offset): the baseline HQQ is measured against."""
    rows, k = data.shape
    blocks = np.asarray(data, np.float32).reshape(rows, k // BLOCK, BLOCK)
    low, high = blocks.min(-1), blocks.max(-1)
    scale = (high - low) / 15
    inverse = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
    q = np.clip(np.round((blocks - low[..., None]) * inverse[..., None]), 0, 15).astype(np.uint8)
    return AffineBlocks(scale, low, q, "rtn")


@dataclass(frozen=True)
class DenseMlp:
    """Where a pruned checkpoint's MLP neurons sit in the dense model, and the dense down_proj weights."""

    keep: np.ndarray  # (layers, kept) sorted dense indices of the kept neurons
    down: list[np.ndarray]  # per layer (hidden, dense width) float32


def with_dense_width(weights: dict[str, np.ndarray], dense: DenseMlp) -> dict[str, np.ndarray]:
    """A llama checkpoint's tensors with each layer's MLP at the dense width: removed neurons as zero gate/up
    rows (and zero gate/up biases), so their activation is exactly silu(0) * 0 = 0, and the dense model's
    down_proj columns. The result computes what the checkpoint computes, and every down_proj block is the
    dense model's."""
    out = dict(weights)
    for i, keep in enumerate(dense.keep):
        width = dense.down[i].shape[1]
        prefix = f"model.layers.{i}.mlp."
        for part in ("gate_proj", "up_proj"):
            for kind in ("weight", "bias"):
                if (key := f"{prefix}{part}.{kind}") in weights:
                    value = weights[key]
                    full = np.zeros((width, *value.shape[1:]), dtype=value.dtype)
                    full[keep] = value
                    out[key] = full
        down = dense.down[i].astype(weights[f"{prefix}down_proj.weight"].dtype)  # a copy
        down[:, keep] = weights[f"{prefix}down_proj.weight"]
        out[f"{prefix}down_proj.weight"] = down
    return out
