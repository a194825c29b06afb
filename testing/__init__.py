"""What the tests, the benchmarks and ``seamline demo`` share, defined once (not installed on a device).

linkemu   LinkEmulator: a TCP proxy with delay, rate limits, stalls and traces (``python -m seamline.testing.linkemu``)
procs     Child (a subprocess whose output is read continuously), CloudProcess (``seamline cloud``), launchers
servers   in-process servers on a thread's own loop (ServerThread, AgentThread), health checks, a test
          CloudConfig, token files and a secured (mutual TLS) cloud
models    tiny random checkpoints of every family, ``cut`` (partition one into a bundle), the torch stand-in
          of the edge's half, references
bundles   a minimal manifest and placeholder bundle for the manifest tests (no graphs)
certs     a throw-away PKI (CA, server, client and rogue certificates) made with ``cryptography``, the
          cloud's mutual-TLS settings and a client's credentials for it
nginx     nginx as the L7 gRPC balancer (``grpc_pass``, round-robin per call) in front of cloud replicas
wait      ``wait_until(condition, timeout)``: poll a condition instead of sleeping a fixed time

Modules import their heavy dependencies (torch, grpc, cryptography) where used, so that importing this
package costs nothing.
"""
