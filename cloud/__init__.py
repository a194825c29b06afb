"""The cloud service: layers k..L and the LM head behind gRPC (see cloud/server.py for the map).

config     CloudConfig (defaults < file < flags)        sessions   Session, SessionStore (KV bytes, TTL)
sampling   greedy / temperature / top-k / top-p          executor   TorchExecutor (one worker thread)
scheduler  BatchScheduler (micro-batched decode)         wire       protobuf <-> domain, validation
auth       bearer tokens, TLS                            metrics    Prometheus
service    the gRPC servicer                             server     serve(config) -> RunningServer
cli        `seamline cloud`
"""
