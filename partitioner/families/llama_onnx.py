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

import json

import numpy as np
import torch
from seamline.protos.bundle import KV_IN_PLACE_META, ROPE_META

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
    if adapter.shape.head_dim % 16:
        return f"head size {adapter.shape.head_dim} (ONNX Runtime's GroupQueryAttention takes multiples of 16)"
    layer = adapter.core.layers[0]
    if type(layer.mlp).__name__ not in ("LlamaMLP", "Qwen2MLP", "MistralMLP") or \
            getattr(c, "hidden_act", "silu") != "silu":
        return f"MLP {type(layer.mlp).__name__} with {getattr(c, 'hidden_act', '?')}"
    return None


class _Builder:
    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes: list = []
        self.inits: list = []
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


def build_block(adapter, i: int, opset: int):
    """Block ``i`` of a Llama-family adapter as an ``onnx.ModelProto`` (see the module's docstring)."""
    from onnx import TensorProto, helper

    s = adapter.shape
    layer = adapter.core.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    c, h, hkv, d = s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim
    rot = adapter.core.rotary_emb
    b = _Builder()

    # attention: q/k/v projections, then GroupQueryAttention rotates q and k (cos/sin tables of the runtime,
    # rows by position) and attends over the cache
    inv_freq = rot.inv_freq.detach().float().numpy()  # (D/2,)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    x = _rms_norm(b, "hidden", layer.input_layernorm, f"layers.{i}.input_layernorm")
    q = _linear(b, x, attn.q_proj, f"layers.{i}.q_proj")
    k = _linear(b, x, attn.k_proj, f"layers.{i}.k_proj")
    v = _linear(b, x, attn.v_proj, f"layers.{i}.v_proj")
    # lengths from the positions (the cache holds exactly the positions before the first one), not from
    # past_key's shape: the runtime may pass a larger buffer that GroupQueryAttention fills in place
    last = b.one("Cast", b.one("Gather", "position_ids", b.const("last", np.array(-1, np.int64)), axis=1),
                 to=TensorProto.INT32)  # (1,): total length - 1, batch 1
    total = b.one("Reshape", b.one("Add", last, b.const("one32", np.array([1], np.int32))),
                  b.const("scalar", np.array([], np.int64)))  # ()
    y = b.op("GroupQueryAttention", [q, k, v, "past_key", "past_value", last, total, "rope_cos", "rope_sin"],
             outputs=1, domain=MS, num_heads=h, kv_num_heads=hkv, scale=float(attn.scaling), do_rotary=1,
             rotary_interleaved=0)[0]
    b.nodes[-1].output.extend(["present_key", "present_value"])
    o = _linear(b, y, attn.o_proj, f"layers.{i}.o_proj")

    # MLP: down(silu(gate(x)) * up(x)), after the residual add fused into the norm
    norm = layer.post_attention_layernorm
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    x, _, _, hidden = b.op("SkipSimplifiedLayerNormalization",
                           [o, "hidden", b.const(f"layers.{i}.post_attention_layernorm.weight",
                                                 norm.weight.detach().float().numpy())],
                           outputs=4, domain=MS, epsilon=eps)
    gate = _linear(b, x, mlp.gate_proj, f"layers.{i}.gate_proj")
    up = _linear(b, x, mlp.up_proj, f"layers.{i}.up_proj")
    act = b.one("Mul", b.one("Mul", gate, b.one("Sigmoid", gate)), up)
    b.nodes.append(helper.make_node("Add", [hidden, _linear(b, act, mlp.down_proj, f"layers.{i}.down_proj")],
                                    ["hidden_out"]))

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("hidden", f32, [1, "T", c]),
              helper.make_tensor_value_info("past_key", f32, [1, hkv, "P", d]),
              helper.make_tensor_value_info("past_value", f32, [1, hkv, "P", d]),
              helper.make_tensor_value_info("position_ids", i64, [1, "T"]),
              helper.make_tensor_value_info("rope_cos", f32, ["N", d // 2]),
              helper.make_tensor_value_info("rope_sin", f32, ["N", d // 2])]
    outputs = [helper.make_tensor_value_info("hidden_out", f32, [1, "T", c]),
               helper.make_tensor_value_info("present_key", f32, [1, hkv, "S", d]),
               helper.make_tensor_value_info("present_value", f32, [1, hkv, "S", d])]
    graph = helper.make_graph(b.nodes, f"llama_block_{i}", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="seamline")
    helper.set_model_props(model, {KV_IN_PLACE_META: "1", ROPE_META: json.dumps(
        {"inv_freq": [float(f) for f in inv_freq], "scaling": scaling})})
    return model
