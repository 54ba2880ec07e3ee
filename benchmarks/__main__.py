"""Run every benchmark: ``python -m benchmarks`` (``--quick`` for CI, under a minute).

Each benchmark starts its own processes on free ports (redis-server, ``upbit-broker
simulate``, ``upbit-broker run``, consumer processes) and stops them; this prints one table
and writes one JSON record (machine, versions, settings, figures) to
``benchmarks/results/latest.json`` (or ``--output``). ``--plot`` then draws the record's SVG
charts into ``docs/`` (``--plot-only``: from the record at ``--output``, without running).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from benchmarks import harness as h
from benchmarks import profiling, report

SECTIONS = (
    "hotpath",
    "throughput",
    "latency",
    "resubscribe",
    "recovery",
    "scale",
    "ceilings",
    "cryptofeed",
    "redis_py",
    "wholemarket",
    "history",
    "gateway",
    "replicas",
    "cluster",
)
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
DEFAULT_PLOT_DIR = Path(__file__).resolve().parents[1] / "docs"


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import (
        bench_ceilings,
        bench_cluster,
        bench_cryptofeed,
        bench_gateway,
        bench_history,
        bench_hotpath,
        bench_latency,
        bench_recovery,
        bench_replicas,
        bench_resubscribe,
        bench_scale,
        bench_throughput,
        bench_wholemarket,
    )

    quick = args.quick
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if quick:
        only.discard("redis_py")
        if not args.only:
            # wholemarket: minutes of long windows; gateway: three stacks of processes (its
            # own test runs it); replicas, cluster: three redis-servers and a stack per run.
            # --quick --only wholemarket (or gateway, replicas, cluster): a smoke run
            only.discard("wholemarket")
            only.discard("gateway")
            only.discard("replicas")
            only.discard("cluster")
    record: dict[str, Any] = {
        "benchmark": "upbit-broker",
        "mode": "quick" if quick else "full",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": h.machine(),
        "settings": {
            "namespace": h.NAMESPACE,
            "load_types": list(h.LOAD_TYPES),
            "broker": "upbit-broker run, defaults (leader_ttl 5 s, coalesce 50 ms, "
            "rate 4/s 90/min, last-value cache on)",
            "broker_root": h.BROKER_COMMAND["root"],
            "publisher": h.BROKER_COMMAND["publisher"],
            "simulator": "upbit-broker simulate, tick 10 ms, no compression, no UP frames",
            "consumer": "benchmarks.consumer hiredis (plain SUBSCRIBE, hiredis.Reader)",
            "quiet_wait_s": h.QUIET["max_wait"],
            "quiet_threshold_cores": h.QUIET["threshold"],
        },
    }
    profile = profiling.profiler(Path(args.output).parent) if args.profile else None
    if args.profile and profile is None:
        print("--profile: neither austin nor py-spy is installed (pip install -e '.[bench]')")
    timings: dict[str, float] = {}
    record["section_seconds"] = timings
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 1)
        clock = now

    errors: dict[str, str] = {}

    async def section(name: str, run: Any) -> None:
        """Run one benchmark; a failure is recorded and the others still run."""
        try:
            result = run()
            record[name] = await result if asyncio.iscoroutine(result) else result
        except Exception as exc:
            import traceback

            errors[name] = "".join(traceback.format_exception(exc))[-3000:]
            print(f"  {name} FAILED: {exc!r}", flush=True)
        lap(name)

    with h.redis_server() as server:
        lap("start")
        if "hotpath" in only:
            print("hot path (in-process) ...", flush=True)
            await section("hotpath", lambda: bench_hotpath.run(quick))
        if "throughput" in only:
            print("throughput ...", flush=True)
            await section("throughput", lambda: bench_throughput.run(server, quick, profile))
        if "redis_py" in only:
            print("throughput, broker publishing through redis-py pipelines ...", flush=True)
            h.configure_broker(h.BROKER_COMMAND["root"], "redis-py")
            loads = [(1000, 1, "hiredis"), (5000, 1, "hiredis"), (20000, 1, "hiredis")]
            try:
                await section(
                    "throughput_redis_py",
                    lambda: bench_throughput.run_plan(server, loads, quick, with_baseline=False),
                )
            finally:
                h.configure_broker(h.BROKER_COMMAND["root"], "resp")
        if "latency" in only:
            print("latency ...", flush=True)
            await section("latency", lambda: bench_latency.run(server, quick))
        if "resubscribe" in only:
            print("resubscribe ...", flush=True)
            await section("resubscribe", lambda: bench_resubscribe.run(server, quick))
        if "recovery" in only:
            print("recovery ...", flush=True)
            await section("recovery", lambda: bench_recovery.run(server, quick))
        if "scale" in only:
            print("scale ...", flush=True)
            await section("scale", lambda: bench_scale.run(server, quick))
        if "ceilings" in only:
            print("ceilings ...", flush=True)
            size = int(record.get("hotpath", {}).get("mean_frame_bytes", 1800))
            await section("ceilings", lambda: bench_ceilings.run(server, quick, size))
        if "cryptofeed" in only:
            print("cryptofeed side by side ...", flush=True)
            await section("cryptofeed", lambda: bench_cryptofeed.run(server, quick))
        if "wholemarket" in only:
            print("whole market ...", flush=True)
            await section("wholemarket", lambda: bench_wholemarket.run(server, quick))
        if "history" in only:
            print("history on/off ...", flush=True)
            await section("history", lambda: bench_history.run(server, quick))
        if "gateway" in only:
            print("gateway (Upbit-compatible clients) ...", flush=True)
            await section("gateway", lambda: bench_gateway.run(server, quick))
        if "replicas" in only:
            print("fan-out from replicas (a master and two replicas) ...", flush=True)
            await section("replicas", lambda: bench_replicas.run(server, quick))
        if "cluster" in only:
            print(
                "redis cluster, sharded pub/sub (one redis against three masters) ...", flush=True
            )
            await section("cluster", lambda: bench_cluster.run(server, quick))
    record["errors"] = errors
    git, dirty = h.git_state()
    record["git_at_end"] = {"git": git, "dirty": dirty}
    record["summary"] = report.summary(record)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI subset (< 60 s)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="JSON record path")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--broker-root", help="run brokers from this checkout (compare commits)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the broker (austin, else py-spy) in each throughput run",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds a measured window may wait for other load on the machine to drop "
        "(default 30, 0 with --quick)",
    )
    parser.add_argument(
        "--plot", action="store_true", help="also write the SVG charts of the record (docs/)"
    )
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="only write the SVG charts, from the JSON record at --output (runs nothing)",
    )
    parser.add_argument(
        "--plot-dir", default=str(DEFAULT_PLOT_DIR), help="where the charts go (docs/)"
    )
    args = parser.parse_args(argv)
    if args.only:
        unknown = set(args.only.split(",")) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections: {','.join(sorted(unknown))}")
    if args.plot_only:
        _plot(json.loads(Path(args.output).read_text()), Path(args.plot_dir))
        return
    h.configure_broker(args.broker_root, "resp")
    wait = args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 30.0)
    h.QUIET["max_wait"] = wait
    started = time.monotonic()
    record = asyncio.run(_run(args))
    record["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print()
    print(report.table(record))
    print(f"\nrecord: {out}  ({record['elapsed_s']} s)")
    if args.plot:
        _plot(record, Path(args.plot_dir))
    if record["errors"]:
        print(f"FAILED sections: {', '.join(record['errors'])}")
        raise SystemExit(1)


def _plot(record: dict[str, Any], directory: Path) -> None:
    from benchmarks import plot

    for path in plot.write_charts(record, directory):
        print(f"chart: {path}")


if __name__ == "__main__":
    main()
