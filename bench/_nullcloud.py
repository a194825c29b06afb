"""``python -m seamline.bench._nullcloud [seamline cloud flags]``: the cloud service with a zero-cost model.

The real server (``cloud.server.serve``: servicer, scheduler, batching, codec, KV extents) with
``cloud.executor.NullExecutor`` in place of the torch executor: blocks, head and sampler cost nothing,
so the steps/s it sustains is the framework's ceiling (``seamline bench throughput --null-executor``).
It prints the same "listening on" line as ``seamline cloud`` and stops on SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys


async def _serve(config) -> None:
    from seamline.cloud.executor import NullExecutor
    from seamline.cloud.server import serve
    from seamline.protos import memory

    running = await serve(config, make_executor=NullExecutor)
    memory.settle_heap()  # as seamline cloud does after start-up
    print(f"seamline cloud listening on {running.address} (model {running.model.model_id}, null executor)",
          flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: loop.create_task(running.stop(0.5)))
    await running.wait_closed()


def main(argv: list[str] | None = None) -> int:
    from seamline.cloud.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="seamline.bench._nullcloud", description=__doc__)
    add_arguments(parser)
    asyncio.run(_serve(config_from_args(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
