#!/usr/bin/env python
"""Throughput of the feedback client against a loopback OpenAI-compatible server whose
every answer takes a fixed latency: requests/s at several concurrency levels versus the
ideal concurrency / latency. The server runs in its own process (as a real endpoint
would), the client with its cache, limits and accounting on, exactly as the stages use it.

  python tools/benchmark_feedback.py --latency_ms 50 --concurrency 1 16 64 256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

from rlaif_jax.cli import run


def _serve(latency_s: float, port_q) -> None:
    import asyncio

    from aiohttp import web

    from rlaif_jax.feedback.server.app import make_app
    from rlaif_jax.feedback.server.testing import FixedLatency

    async def main():
        runner = web.AppRunner(make_app(FixedLatency(latency_s)), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=2048)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency_ms", type=float, default=50.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--requests_per_worker", type=int, default=8, help="requests = max(min_requests, c * this)")
    ap.add_argument("--min_requests", type=int, default=40)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING)
    from rlaif_jax.feedback.client import FeedbackClient

    latency = args.latency_ms / 1000.0
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    server = ctx.Process(target=_serve, args=(latency, q), daemon=True)
    server.start()
    rows = []
    try:
        port = q.get(timeout=60)
        url = f"http://127.0.0.1:{port}/v1"
        print(
            f"server: loopback 127.0.0.1:{port}, fixed latency {args.latency_ms:g} ms, separate process; "
            f"client: FeedbackClient with JSONL cache, {os.cpu_count()} CPU cores"
        )
        print(f"{'concurrency':>11} {'requests':>8} {'seconds':>8} {'req/s':>9} {'ideal':>9} {'efficiency':>10}")
        for c in args.concurrency:
            n = max(args.min_requests, c * args.requests_per_worker)
            with tempfile.TemporaryDirectory() as d:
                client = FeedbackClient(
                    model="bench",
                    cache_path=os.path.join(d, "cache.jsonl"),
                    base_url=url,
                    api_key_env="BENCHMARK_UNSET_KEY",
                    max_concurrency=c,
                    progress=False,
                    timeout_s=30.0,
                    prices={"bench": (1.0, 1.0)},
                )
                # warm-up: connections and code paths, not counted
                client.run([client.request([{"role": "user", "content": f"warm {c} {i}"}]) for i in range(min(c, 32))])
                reqs = [client.request([{"role": "user", "content": f"bench {c} {i}"}]) for i in range(n)]
                t0 = time.perf_counter()
                res = client.run(reqs)
                dt = time.perf_counter() - t0
                client.close()
            errors = sum(r["status"] != "ok" for r in res)
            rate, ideal = n / dt, c / latency
            rows.append(
                {
                    "concurrency": c,
                    "requests": n,
                    "seconds": round(dt, 3),
                    "requests_per_s": round(rate, 1),
                    "ideal_requests_per_s": round(ideal, 1),
                    "efficiency": round(rate / ideal, 3),
                    "errors": errors,
                }
            )
            print(
                f"{c:>11} {n:>8} {dt:>8.2f} {rate:>9.1f} {ideal:>9.1f} {rate / ideal:>10.1%}"
                + (f"  ({errors} errors)" if errors else "")
            )
    finally:
        server.terminate()
        server.join(5)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latency_ms": args.latency_ms, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
