"""The edge: the front half in ONNX Runtime, the link to the cloud, the agent and its local API.

No torch or transformers here (a test imports every module and checks). The map:

runtime     EdgeRuntime: ORT sessions, EdgeCache, tokenizer  worker      ComputeWorker (the ORT thread)
config      EdgeConfig (defaults < file < flags)             messages    plain data objects
wire        protobuf <-> domain, gRPC status -> link errors  link        CloudLink, LinkSession (failover)
engine      GenerationEngine (shared wiring, validation)     generation  the loop: prefill, replay, fallback
policy      SplitPolicy hook, FixedPolicy                    sampling    local sampling (numpy)
text        detokenizing, stop strings, chat template        openai_compat  request parsing, reply shapes
api         Starlette routes                                 metrics     Prometheus text by hand
agent       EdgeAgent daemon (uvicorn, SIGTERM drain)        cli         `seamline edge`, `seamline generate`
errors      EdgeError and its kinds
planner, controller  the adaptive split (cost model, live decisions)
"""
