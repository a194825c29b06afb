"""The cloud service: layers k..L and the LM head behind gRPC (see cloud/server.py for the map).

config     CloudConfig (defaults < file < env < flags)  sessions   Session, SessionStore (bytes, TTL; no torch)
sampling   greedy / temperature / top-k / top-p          executor   TorchExecutor (one worker thread)
kvpool     KVPool: the KV tensors, keyed by session      errors     domain errors -> status codes
scheduler  BatchScheduler (micro-batched decode)         wire       protobuf <-> domain, validation
auth       bearer tokens, TLS                            metrics    Prometheus
service    the gRPC servicer (Info, Generate)            server     serve(config) -> RunningServer
cli        `seamline cloud`
"""
