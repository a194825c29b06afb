"""Container health check of `seamline cloud`: grpc.health.v1.Health/Check, exit 0 when SERVING.

Used by the image's HEALTHCHECK (docker, compose). Kubernetes uses its native `grpc:` probe instead.
Settings come from the environment so one image fits every deployment:

  SEAMLINE_HEALTH_ADDR     HOST:PORT to ask (default 127.0.0.1:50051)
  SEAMLINE_HEALTH_SERVICE  service name to ask about (default seamline.v1.Seamline; "" = the server)
  SEAMLINE_HEALTH_TIMEOUT  seconds (default 4)
  SEAMLINE_HEALTH_CA       PEM file: connect with TLS and trust this CA (when the server has --tls-cert)
  SEAMLINE_HEALTH_CERT / SEAMLINE_HEALTH_KEY   client certificate and key (when it has --client-ca)
  SEAMLINE_HEALTH_TLS_NAME name the server certificate must carry (default: the host of the address)

Exit status: 0 SERVING, 1 anything else (NOT_SERVING while draining, unreachable, timeout).
"""

from __future__ import annotations

import os
import sys


def check(env: dict[str, str] | None = None) -> tuple[bool, str]:
    env = dict(os.environ if env is None else env)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    addr = env.get("SEAMLINE_HEALTH_ADDR", "127.0.0.1:50051")
    service = env.get("SEAMLINE_HEALTH_SERVICE", "seamline.v1.Seamline")
    timeout = float(env.get("SEAMLINE_HEALTH_TIMEOUT", "4"))
    ca = env.get("SEAMLINE_HEALTH_CA")
    if ca:
        def read(name: str) -> bytes | None:
            path = env.get(name)
            if not path:
                return None
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(read("SEAMLINE_HEALTH_CA"), read("SEAMLINE_HEALTH_KEY"),
                                             read("SEAMLINE_HEALTH_CERT"))
        options = [("grpc.ssl_target_name_override", env["SEAMLINE_HEALTH_TLS_NAME"])] \
            if env.get("SEAMLINE_HEALTH_TLS_NAME") else []
        channel = grpc.secure_channel(addr, creds, options=options)
    else:
        channel = grpc.insecure_channel(addr)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as e:
        return False, f"{addr}: {e.code().name}: {e.details()}"
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{addr} {service or '(server)'}: {status}"


def main() -> int:
    ok, message = check()
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
