"""The Llama-family block as an ONNX graph built directly, around ONNX Runtime's fused attention.

torch's exporter turns the adapter's block into ~60 small nodes per block: the keys and values are
expanded to every query head (grouped-query attention done by copying), transposed, masked with an
explicit causal matrix and concatenated; on SmolLM2 at a 512-token context those nodes cost about as
much as the block's weights (measured with ONNX Runtime's profiler: MatMul 47 % of a decode step,
Transpose + Concat + Expand + FusedMatMul 36 %). This module writes the same computation the way
on-device runtimes do (onnxruntime-genai's builder among them): ``GroupQueryAttention`` (com.microsoft)
reads the kv heads where they are and appends the new positions to the cache itself.

The graph keeps the exported block's interface, so the runtime, the swapper and the quantizers see no
difference: inputs ``hidden`` (1, T, C), ``past_key`` / ``past_value`` (1, Hkv, P, D), ``position_ids``
(1, T); outputs ``hidden_out``, ``present_key`` / ``present_value`` (1, Hkv, P + T, D). Batch 1, as the
edge runs. The rotary embedding is computed from ``position_ids`` with the model's own ``inv_freq`` and
``attention_scaling`` (static rope types only: default, linear, llama3; others are exported by torch).
Projection weights are MatMul initializers holding the Hugging Face weight transposed (K, N), the form
the weight-only quantizer and the GGUF block carrier look for. ``export.export_blocks`` checks each
graph against the model's block with ONNX Runtime before keeping it and exports with torch otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

STATIC_ROPE = (None, "default", "linear", "llama3")
MS = "com.microsoft"


def rope_type(config) -> str | None:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None


def unsupported(adapter) -> str | None:
    """Why the block cannot be built here (None when it can)."""
    c = adapter.model.config
    if rope_type(c) not in STATIC_ROPE:
        return f"rope type {rope_type(c)!r} changes with the sequence length"
    rot = adapter.core.rotary_emb
    if getattr(rot, "inv_freq", None) is None:
        return "the model's rotary module has no inv_freq"
    if getattr(c, "partial_rotary_factor", 1.0) not in (None, 1.0):
        return "partial rotary embeddings"
    layer = adapter.core.layers[0]
    if type(layer.mlp).__name__ not in ("LlamaMLP", "Qwen2MLP", "MistralMLP") or \
            getattr(c, "hidden_act", "silu") != "silu":
        return f"MLP {type(layer.mlp).__name__} with {getattr(c, 'hidden_act', '?')}"
    return None


class _Builder:
    def __init__(self, opset: int):
        from onnx import helper

        self.h = helper
        self.nodes: list = []
        self.inits: list = []
        self.opset = opset
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), n))
        return n

    def op(self, op: str, inputs: list[str], outputs: int = 1, domain: str = "", **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(outputs)]
        self.nodes.append(self.h.make_node(op, inputs, outs, domain=domain or None, **attrs))
        return outs

    def one(self, op: str, *inputs: str, **attrs) -> str:
        return self.op(op, list(inputs), **attrs)[0]


def _weight(b: _Builder, base: str, w: torch.Tensor) -> str:
    return b.const(base, w.detach().float().numpy().T)  # (K, N): x @ W^T


def _linear(b: _Builder, x: str, lin: torch.nn.Module, base: str) -> str:
    y = b.one("MatMul", x, _weight(b, f"{base}.weight", lin.weight))
    if getattr(lin, "bias", None) is not None:
        y = b.one("Add", y, b.const(f"{base}.bias", lin.bias.detach().float().numpy()))
    return y


def _rms_norm(b: _Builder, x: str, norm: torch.nn.Module, base: str) -> str:
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    w = b.const(f"{base}.weight", norm.weight.detach().float().numpy())
    return b.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=eps, stash_type=1)[0]


def _rotary(b: _Builder, x: str, heads: int, d: int, cos: str, sin: str, shape_h: str, shape_flat: str) -> str:
    """x (1, T, heads*D) -> the same with the rotary embedding applied per head (HF's rotate_half form)."""
    x4 = b.one("Reshape", x, shape_h)  # (1, T, heads, D)
    x1, x2 = b.op("Split", [x4, b.const("half", np.array([d // 2, d // 2], np.int64))], outputs=2, axis=-1)
    rot = b.one("Concat", b.one("Neg", x2), x1, axis=-1)
    y = b.one("Add", b.one("Mul", x4, cos), b.one("Mul", rot, sin))
    return b.one("Reshape", y, shape_flat)


def build_block(adapter, i: int, opset: int):
    """Block ``i`` of a Llama-family adapter as an ``onnx.ModelProto`` (see the module's docstring)."""
    from onnx import TensorProto, helper

    s = adapter.shape
    layer = adapter.core.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    c, h, hkv, d = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
    rot = adapter.core.rotary_emb
    b = _Builder(opset)

    # positions -> cos, sin (1, T, 1, D), as the model's rotary module computes them (float32)
    inv_freq = rot.inv_freq.detach().float().numpy().reshape(1, 1, -1)  # (1, 1, D/2)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    pos = b.one("Unsqueeze", b.one("Cast", "position_ids", to=TensorProto.FLOAT),
                b.const("axis_last", np.array([-1], np.int64)))  # (1, T, 1)
    freqs = b.one("Mul", pos, b.const("inv_freq", inv_freq.astype(np.float32)))  # (1, T, D/2)
    emb = b.one("Concat", freqs, freqs, axis=-1)  # (1, T, D)
    axis2 = b.const("axis2", np.array([2], np.int64))
    cos, sin = b.one("Cos", emb), b.one("Sin", emb)
    if scaling != 1.0:
        k = b.const("attention_scaling", np.array(scaling, np.float32))
        cos, sin = b.one("Mul", cos, k), b.one("Mul", sin, k)
    cos, sin = b.one("Unsqueeze", cos, axis2), b.one("Unsqueeze", sin, axis2)

    # attention: q/k/v projections, rotary, GroupQueryAttention over the cache
    x = _rms_norm(b, "hidden", layer.input_layernorm, f"layers.{i}.input_layernorm")
    q = _linear(b, x, attn.q_proj, f"layers.{i}.q_proj")
    k = _linear(b, x, attn.k_proj, f"layers.{i}.k_proj")
    v = _linear(b, x, attn.v_proj, f"layers.{i}.v_proj")
    q = _rotary(b, q, h, d, cos, sin, b.const("shape_q", np.array([1, -1, h, d], np.int64)),
                b.const("shape_qf", np.array([1, -1, h * d], np.int64)))
    k = _rotary(b, k, hkv, d, cos, sin, b.const("shape_k", np.array([1, -1, hkv, d], np.int64)),
                b.const("shape_kf", np.array([1, -1, hkv * d], np.int64)))
    past_len = b.one("Gather", b.one("Shape", "past_key"), b.const("two", np.array(2, np.int64)), axis=0)
    new_len = b.one("Gather", b.one("Shape", "hidden"), b.const("one", np.array(1, np.int64)), axis=0)
    total = b.one("Cast", b.one("Add", past_len, new_len), to=TensorProto.INT32)  # scalar
    seqlens_k = b.one("Reshape", b.one("Sub", total, b.const("one32", np.array(1, np.int32))),
                      b.const("shape_b", np.array([1], np.int64)))  # (1,)
    y, present_k, present_v = b.op(
        "GroupQueryAttention", [q, k, v, "past_key", "past_value", seqlens_k, total], outputs=3, domain=MS,
        num_heads=h, kv_num_heads=hkv, scale=float(attn.scaling))
    b.nodes.append(helper.make_node("Identity", [present_k], ["present_key"]))
    b.nodes.append(helper.make_node("Identity", [present_v], ["present_value"]))
    hidden = b.one("Add", "hidden", _linear(b, y, attn.o_proj, f"layers.{i}.o_proj"))

    # MLP: down(silu(gate(x)) * up(x))
    x = _rms_norm(b, hidden, layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm")
    gate = _linear(b, x, mlp.gate_proj, f"layers.{i}.gate_proj")
    up = _linear(b, x, mlp.up_proj, f"layers.{i}.up_proj")
    act = b.one("Mul", b.one("Mul", gate, b.one("Sigmoid", gate)), up)
    out = b.one("Add", hidden, _linear(b, act, mlp.down_proj, f"layers.{i}.down_proj"))
    b.nodes.append(helper.make_node("Identity", [out], ["hidden_out"]))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("hidden", f32, [1, "T", c]),
              helper.make_tensor_value_info("past_key", f32, [1, hkv, "P", d]),
              helper.make_tensor_value_info("past_value", f32, [1, hkv, "P", d]),
              helper.make_tensor_value_info("position_ids", i64, [1, "T"])]
    outputs = [helper.make_tensor_value_info("hidden_out", f32, [1, "T", c]),
               helper.make_tensor_value_info("present_key", f32, [1, hkv, "S", d]),
               helper.make_tensor_value_info("present_value", f32, [1, hkv, "S", d])]
    graph = helper.make_graph(b.nodes, f"llama_block_{i}", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             producer_name="seamline")
