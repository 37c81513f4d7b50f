"""4-bit weights in an ONNX graph from exact blocks (pure graph rewriting, no I/O): every MatMul on a constant
(K, N) weight becomes onnxruntime's `MatMulNBits` on the weight's own blocks (exporter/export/q4blocks.py).

A 4-bit affine block w = d * q + m is stored as symmetric `MatMulNBits` blocks (scale d, the default zero point
8) plus the block's offset c = m + 8 d carried by a small fp32 product: x @ W = MatMulNBits(x) + S(x) @ C, where
S(x) (..., K / 32) sums each 32-value block of the input and C (K / 32, N) holds the offsets. `MatMulNBits` also
takes float zero points (-m / d) and computes the same values, but onnxruntime 1.32's CPU kernel then packs
nothing and de-quantizes the whole matrix on every call: SmolLM2's 30 gate/down_proj pairs, one token, took
345 ms against 44.6 ms as fp32 MatMuls and 24.6 ms with the offsets (one run on a busy machine). An integer zero point
per block cannot hold Q4_1's m. MatMuls on one input (gate and up) run as one MatMulNBits and a Split.

A Q8_0 matrix (SmolLM2's tied LM head) is stored as 8-bit `MatMulNBits` (q + 128 with the default zero point
128), or, for fp32 activations, as two 4-bit halves of the same bits over the input taken twice (see
`_split_int8`): onnxruntime 1.32 has a fast fp32-activation kernel for 4 bits but not for 8.

With accuracy_level 1 the kernels keep fp32 activations and the graph computes what the weights compute up to
fp32 summation order; level 4 quantizes the activations to int8 per block inside the kernel (as llama.cpp does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.export.q4blocks import BLOCK, AffineBlocks, Int8Blocks, hqq_blocks, q4_1_blocks, q8_0_blocks, rtn_blocks

HEAD_MODES = ("int8", "split")
FALLBACKS = {
    "hqq": hqq_blocks,
    "rtn": rtn_blocks,
}  # 4-bit blocks of a matrix without exact blocks  # how a Q8_0 matrix is stored: 8-bit MatMulNBits, or two 4-bit halves


@dataclass
class Rewritten:
    """What the rewrite did, matrix by matrix."""

    blocks: dict[str, str] = field(default_factory=dict)  # weight name -> "q4_1", "q8_0", "hqq" or "fp32"

    def count(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in self.blocks.values():
            out[kind] = out.get(kind, 0) + 1
        return dict(sorted(out.items()))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, blocks, 32) values 0..15 -> (rows, blocks, 16) bytes, value 2i in the low nibble (MatMulNBits)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_nibbles`."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def matrix_blocks(rows: np.ndarray, fallback: str | None) -> AffineBlocks | Int8Blocks | None:
    """The blocks a (N, K) matrix is stored in: its exact Q4_1 blocks, else its exact Q8_0 blocks, else
    `fallback` ("hqq", "rtn") 4-bit blocks, else None (kept fp32; also when K is not a multiple of 32)."""
    if rows.shape[1] % BLOCK:
        return None
    found = q4_1_blocks(rows)
    if found is not None:
        return found
    found8 = q8_0_blocks(rows)
    if found8 is not None:
        return found8
    if fallback is None:
        return None
    return FALLBACKS[fallback](rows)


class _Graph:
    """Node and initializer lists being rebuilt, and the block sums already computed per input."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.sums: dict[str, str] = {}  # input name -> its block sums' name
        self.shapes: dict[int, str] = {}  # K -> name of the shape (0, 0, K / 32, 32)

    def add_init(self, array: np.ndarray, name: str) -> str:
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def block_sums(self, x: str, k: int) -> str:
        """(batch, seq, K / 32) sums of each 32-value block of `x` (batch, seq, K): Reshape + ReduceSum, once per
        input (cheaper per call than a MatMul on a 0/1 matrix: the nodes are tiny and many)."""
        if x not in self.sums:
            if not self.shapes:
                self.add_init(np.array([-1], np.int64), "q4.last_axis")
            if k not in self.shapes:
                self.shapes[k] = self.add_init(np.array([0, 0, k // BLOCK, BLOCK], np.int64), f"q4.blocks_of.{k}")
            blocked, self.sums[x] = f"{x}/q4_blocked", f"{x}/q4_block_sums"
            self.nodes.append(helper.make_node("Reshape", [x, self.shapes[k]], [blocked], name=blocked))
            self.nodes.append(
                helper.make_node("ReduceSum", [blocked, "q4.last_axis"], [self.sums[x]], name=self.sums[x], keepdims=0)
            )
        return self.sums[x]


def quantize_matmuls(
    model: onnx.ModelProto, accuracy_level: int = 1, head: str = "split", fallback: str | None = "hqq"
) -> Rewritten:
    """Replace, in place, each MatMul of `model`'s main graph whose weight is a 2-D initializer by
    MatMulNBits on the weight's blocks (see the module docstring); weights left without a MatMul are dropped.
    `head`: how a Q8_0 matrix is stored ("int8": 8-bit at accuracy_level 4; "split": two 4-bit halves at
    `accuracy_level`)."""
    if head not in HEAD_MODES:
        raise ValueError(f"head {head!r} is not one of {HEAD_MODES}")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    done = Rewritten()
    found: dict[str, AffineBlocks | Int8Blocks | None] = {}  # node name -> the blocks of its weight
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is not None and len(weight.dims) == 2:
            found[node.name] = matrix_blocks(numpy_helper.to_array(weight).T.astype(np.float32), fallback)
            blocks = found[node.name]
            done.blocks[weight.name] = "fp32" if blocks is None else getattr(blocks, "method", "q8_0")
    # MatMuls on one input with 4-bit blocks of the same K (gate and up) run as one MatMulNBits, then a Split
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if isinstance(found.get(node.name), AffineBlocks):
            groups.setdefault(node.input[0], []).append(node)
    g = _Graph(graph)
    for node in list(graph.node):
        blocks = found.get(node.name)
        if blocks is None:
            g.nodes.append(node)
        elif isinstance(blocks, AffineBlocks):
            group = groups[node.input[0]]
            if node is group[0]:
                _affine(g, group, [b for n in group if isinstance(b := found[n.name], AffineBlocks)], accuracy_level)
        elif head == "int8":
            _int8(g, node, node.input[1], blocks)
        else:
            _split_int8(g, node, node.input[1], blocks, accuracy_level)
    del graph.node[:]
    graph.node.extend(g.nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _nbits(
    g: _Graph, x: str, out: str, name: str, packed: np.ndarray, scale: np.ndarray, k: int, bits: int, level: int
) -> None:
    b = g.add_init(packed, f"{name}.q{bits}")
    s = g.add_init(np.ascontiguousarray(scale, np.float32).reshape(-1), f"{name}.q{bits}_scales")
    n = packed.shape[0]
    g.nodes.append(
        helper.make_node(
            "MatMulNBits",
            [x, b, s],
            [out],
            name=f"{out}/MatMulNBits",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=BLOCK,
            accuracy_level=level,
        )
    )


def _add_offsets(g: _Graph, x: str, out: str, name: str, k: int, offsets: np.ndarray) -> None:
    """`out` = `out`/q4_blocks (the MatMulNBits product, already added) + S(x) @ offsets.T, offsets
    (N, K / 32)."""
    c = g.add_init(np.ascontiguousarray(offsets.T, np.float32), f"{name}.q4_offsets")
    term = f"{out}/q4_offsets"
    g.nodes.append(helper.make_node("MatMul", [g.block_sums(x, k), c], [term], name=term))
    g.nodes.append(helper.make_node("Add", [f"{out}/q4_blocks", term], [out], name=f"{out}/q4_add"))


def _affine(g: _Graph, nodes: list[onnx.NodeProto], blocks: list[AffineBlocks], level: int) -> None:
    """MatMulNBits + block offsets for the MatMuls `nodes` on one input (their blocks side by side along N,
    split again after)."""
    x, k = nodes[0].input[0], blocks[0].q.shape[1] * BLOCK
    if len(nodes) > 1 and any(b.q.shape[1] * BLOCK != k for b in blocks):
        for node, one in zip(nodes, blocks, strict=True):
            _affine(g, [node], [one], level)
        return
    name = "|".join(n.input[1] for n in nodes)
    out = nodes[0].output[0] if len(nodes) == 1 else f"{nodes[0].output[0]}/q4_joined"
    scale = np.concatenate([b.scale for b in blocks])
    q = np.concatenate([b.q for b in blocks])
    _nbits(g, x, f"{out}/q4_blocks", name, pack_nibbles(q), scale, k, 4, level)
    _add_offsets(g, x, out, name, k, np.concatenate([b.offset for b in blocks]) + 8 * scale)
    if len(nodes) > 1:
        sizes = g.add_init(np.array([b.q.shape[0] for b in blocks], np.int64), f"{name}.q4_split")
        outputs = [n.output[0] for n in nodes]
        g.nodes.append(helper.make_node("Split", [out, sizes], outputs, name=f"{out}/q4_split", axis=-1))


def _int8(g: _Graph, node: onnx.NodeProto, name: str, blocks: Int8Blocks) -> None:
    """8-bit MatMulNBits (q + 128 with the default zero point 128) at accuracy_level 4 (onnxruntime 1.32 has
    no fast fp32-activation kernel for 8 bits)."""
    k = blocks.q.shape[1] * BLOCK
    unsigned = (blocks.q.astype(np.int16) + 128).astype(np.uint8)
    _nbits(g, node.input[0], node.output[0], name, unsigned, blocks.scale, k, 8, 4)


def _split_int8(g: _Graph, node: onnx.NodeProto, name: str, blocks: Int8Blocks, level: int) -> None:
    """A Q8_0 matrix as 4-bit MatMulNBits over [x, x]: with u = q + 128 = 16 h + l (h, l in 0..15),
    d * q = 16 d (h - 8) + d (l - 8) + 8 d, so the first K inputs see the blocks of h at scale 16 d, the
    second K the blocks of l at scale d, and 8 d is each block's offset."""
    x, out = node.input[0], node.output[0]
    k = blocks.q.shape[1] * BLOCK
    u = (blocks.q.astype(np.int16) + 128).astype(np.uint8)
    packed = pack_nibbles(np.concatenate([u >> 4, u & 0x0F], axis=1))  # (N, 2 K / 32, 16)
    scale = np.concatenate([16 * blocks.scale, blocks.scale], axis=1)
    doubled = f"{out}/q4_doubled_input"
    g.nodes.append(helper.make_node("Concat", [x, x], [doubled], name=doubled, axis=-1))
    _nbits(g, doubled, f"{out}/q4_blocks", name, packed, scale, 2 * k, 4, level)
    _add_offsets(g, x, out, name, k, 8 * blocks.scale)


def stored_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{weight name: the (N, K) float64 matrix each rewritten MatMul now computes with}, read back from the
    MatMulNBits initializers and block offsets of `model` (an independent check of packing and scales)."""
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name, bits = node.input[1].rsplit(".q", 1)[0], attrs["bits"]
        packed = numpy_helper.to_array(inits[node.input[1]])  # (N, blocks, bytes)
        q = (unpack_nibbles(packed) if bits == 4 else packed).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64).reshape(q.shape[0], -1, 1)
        w = scale * (q - 2 ** (bits - 1))  # the default zero point
        offsets = inits.get(f"{name}.q4_offsets")
        if offsets is not None:
            c = numpy_helper.to_array(offsets).astype(np.float64).T  # (N, K / 32)
            if w.shape[1] == 2 * c.shape[1]:  # a Q8_0 matrix in two 4-bit halves over [x, x]
                w = w[:, : c.shape[1]] + w[:, c.shape[1] :]
            w = w + c[..., None]
        w = w.reshape(w.shape[0], -1)
        sizes = inits.get(f"{name}.q4_split")  # matrices run as one MatMulNBits
        parts = numpy_helper.to_array(sizes).tolist() if sizes is not None else [w.shape[0]]
        for part, rows in zip(name.split("|"), np.split(w, np.cumsum(parts)[:-1]), strict=True):
            out[part] = rows
    return out
