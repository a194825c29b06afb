"""Container health check of `seamline edge`: GET /healthz on the local API, exit 0 on HTTP 200.

Standard library only (the edge image has no extra HTTP client). Settings from the environment:

  SEAMLINE_HEALTH_URL      default http://127.0.0.1:8080/healthz
  SEAMLINE_HEALTH_TIMEOUT  seconds (default 4)
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(env: dict[str, str] | None = None) -> tuple[bool, str]:
    env = dict(os.environ if env is None else env)
    url = env.get("SEAMLINE_HEALTH_URL", "http://127.0.0.1:8080/healthz")
    timeout = float(env.get("SEAMLINE_HEALTH_TIMEOUT", "4"))
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200, f"{url}: HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (OSError, ValueError) as e:
        return False, f"{url}: {e}"


def main() -> int:
    ok, message = check()
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
