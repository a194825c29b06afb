"""The naive split a user would write first: torch front half, raw fp32 bytes, one unary gRPC call per step.

Server (``python -m seamline.bench._naive --model M --split K``): a plain synchronous
``grpc.server`` with a generic unary method; it runs blocks [K, L) with the family adapter
(a KV cache per layer grown with ``torch.cat``, as Hugging Face does), then the head on the last
row, and answers the greedy token. One session at a time: a request at position 0 starts over.

Client (:class:`NaiveSplit`): the same adapter runs embed + blocks [0, K) in eager torch; the
whole prompt goes as one request (T x C float32), then one request per generated token.

Wire format: request = ``<iii`` (start position, T, C) + T*C float32; reply = ``<if`` (token id,
the server's compute ms: for the benchmark's breakdown only).
"""

from __future__ import annotations

import argparse
import struct
import time
from concurrent import futures

import grpc
import numpy as np

METHOD = "/bench.NaiveSplit/Forward"
MAX_MESSAGE = 256 * 2**20
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


class _Half:
    """Blocks [a, b) of a model with a torch.cat KV cache; ``head`` when b == L."""

    def __init__(self, model_name: str, a: int, b: int | None):
        import torch
        from seamline.partitioner.families import adapter_for
        from seamline.partitioner.loading import load_model

        self.torch = torch
        model, _ = load_model(model_name)
        self.adapter = adapter_for(model)
        self.a = a
        self.b = self.adapter.shape.num_layers if b is None else b
        self.cache: list[tuple | None] = []
        self.reset()

    def reset(self) -> None:
        self.cache = [None] * (self.b - self.a)

    def blocks(self, h, start: int):  # h: (1, T, C)
        t = h.shape[1]
        pos = self.torch.arange(start, start + t).unsqueeze(0)  # (1, T)
        for j, i in enumerate(range(self.a, self.b)):
            past_key, past_value = self.cache[j] or (None, None)
            h, key, value = self.adapter.block(i, h, past_key, past_value, pos)
            self.cache[j] = (key, value)
        return h


def serve(model_name: str, split: int, host: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    back = _Half(model_name, split, None)

    @torch.inference_mode()
    def forward(request: bytes, context) -> bytes:
        t0 = time.perf_counter()
        start, t, c = struct.unpack_from("<iii", request)
        if start == 0:
            back.reset()
        h = torch.from_numpy(np.frombuffer(request, dtype=np.float32, offset=12).reshape(1, t, c).copy())
        h = back.blocks(h, start)
        logits = back.adapter.head(h[:, -1:])  # (1, 1, V)
        token = int(logits[0, -1].argmax())
        return struct.pack("<if", token, (time.perf_counter() - t0) * 1e3)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.NaiveSplit", {"Forward": grpc.unary_unary_rpc_method_handler(forward)}),))
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    print(f"naive cloud listening on {host}:{port}", flush=True)
    server.wait_for_termination()


class NaiveSplit:
    """The edge side of the naive split, in this process (torch threads as set by the caller)."""

    def __init__(self, model_name: str, split: int, address: str):
        self.front = _Half(model_name, 0, split)
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.call = self.channel.unary_unary(METHOD)
        self.steps: list[dict] = []  # per request: front, call and server ms, bytes

    def _step(self, ids: list[int], start: int) -> int:
        torch = self.front.torch
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.tensor([ids])
            pos = torch.arange(start, start + len(ids)).unsqueeze(0)
            h = self.front.blocks(self.front.adapter.embed(x, pos), start)[0]  # (T, C)
            payload = struct.pack("<iii", start, *h.shape) + h.contiguous().numpy().astype(np.float32).tobytes()
        t1 = time.perf_counter()
        reply = self.call(payload, timeout=600)
        token, server_ms = struct.unpack("<if", reply)
        self.steps.append({"tokens": len(ids), "front_ms": (t1 - t0) * 1e3, "server_ms": server_ms,
                           "call_ms": (time.perf_counter() - t1) * 1e3, "bytes_sent": len(payload),
                           "bytes_received": len(reply)})
        return token

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float]]:
        """Greedy; returns (start time, arrival time of each token)."""
        self.front.reset()
        self.steps = []
        t0 = time.perf_counter()
        times = []
        token = self._step(prompt, 0)
        times.append(time.perf_counter())
        pos = len(prompt)
        for _ in range(new_tokens - 1):
            token = self._step([token], pos)
            pos += 1
            times.append(time.perf_counter())
        return t0, times

    def close(self) -> None:
        self.channel.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--split", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    try:
        serve(args.model, args.split, args.host, args.threads)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
