"""The table and the goal check of a benchmark record (pure: dicts in, text out)."""

from __future__ import annotations

from typing import Any

#: the issue's goals
GOAL_CPU_US = 25.0
GOAL_ADDED_P99_US = 1000.0
#: issue 16: the whole market for at most 2% of one core; the consumer library within 1.2x of a
#: bare redis-py pub/sub loop per frame
GOAL_WHOLE_MARKET_PCT_CORE = 2.0
GOAL_LIBRARY_VS_REDIS_PY = 1.2
#: issue 14: the gateway relays >= 50k client-frames/s per core of its process, and adds under
#: 1 ms at p99 (1k frames/s) over the broker path
GOAL_GATEWAY_CLIENT_FRAMES_PER_CORE = 50_000
GOAL_GATEWAY_ADDED_P99_US = 1000.0
#: issue 16: the broker adds under 0.5 ms at p99 at 1k frames/s, under 1 ms at 10k (printed
#: with this machine's floor, for records that have the latency benchmark's floor path)
GOAL_ISSUE16_ADDED_P99_US = {1000: 500.0, 10000: 1000.0}


def _mb(n: Any) -> str:
    return f"{n / 2**20:.0f}" if isinstance(n, int | float) and n else "-"


def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "-"
    return format(x, fmt) if isinstance(x, int | float) else str(x)


def _load(target: Any) -> str:
    return "max" if target is None else f"{target / 1000:g}k"


def _label(r: dict[str, Any]) -> str:
    mode = "" if r.get("consumer_mode", "hiredis") == "hiredis" else f" {r['consumer_mode']}"
    return f"{_load(r['target_fps'])} x{r['consumers']}{mode}"


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals against the figures of this record."""
    out: dict[str, Any] = {}
    runs = record.get("throughput", {}).get("runs", [])
    unsat = [r for r in runs if not r["saturated"]]
    if runs:
        out["cpu_us_per_frame"] = {
            "goal": GOAL_CPU_US,
            "by_load": {_label(r): r["broker_cpu_us_per_frame"] for r in runs},
            "met_at": [_label(r) for r in runs if r["broker_cpu_us_per_frame"] <= GOAL_CPU_US],
            # The goal's own reading: 25 us a frame is 40,000 frames/s per core of capacity.
            "goal_frames_per_s_per_core": round(1e6 / GOAL_CPU_US),
            "frames_per_s_per_core": max(
                (
                    round(r["delivered_fps"] / r["broker_cpu_cores"])
                    for r in runs
                    if r["broker_cpu_cores"]
                ),
                default=None,
            ),
            # What a bare websockets client spends at the same rate, and the broker beyond it.
            "bare_client_by_load": {
                _label(r): r.get("bare_client_cpu_us_per_frame")
                for r in runs
                if r.get("bare_client_cpu_us_per_frame") is not None
            },
            "broker_own_by_load": {
                _label(r): r.get("broker_own_cpu_us_per_frame")
                for r in runs
                if r.get("broker_own_cpu_us_per_frame") is not None
            },
        }
        out["zero_loss_below_saturation"] = {
            "runs_below_saturation": len(unsat),
            "met": all(r["loss"] == 0 for r in unsat),
            "losses": {_label(r): r["loss"] for r in runs},
        }
        best = max(runs, key=lambda r: r["delivered_fps"])
        out["max_delivered_fps"] = best["delivered_fps"]
        ceil = record.get("ceilings", {})
        ceilings = [
            ceil.get("redis_publish", {}).get("publish_per_s"),
            ceil.get("websocket_receive", {}).get("frames_per_s"),
        ]
        ceilings = [c for c in ceilings if c]
        if ceilings:
            low = min(ceilings)
            out["fraction_of_lower_ceiling"] = round(best["delivered_fps"] / low, 3)
            out["lower_ceiling_fps"] = low
    wm = record.get("wholemarket", {}).get("runs", [])
    if wm:
        real = min(wm, key=lambda r: r["target_fps"])  # the real rate (~800 frames/s)
        ratios = {_load(r["target_fps"]): r.get("library_vs_redis_py") for r in wm}
        out["whole_market"] = {
            "goal_broker_pct_core": GOAL_WHOLE_MARKET_PCT_CORE,
            "broker_pct_core": {_load(r["target_fps"]): r["broker"]["cpu_pct_core"] for r in wm},
            "met_pct_core": real["broker"]["cpu_pct_core"] <= GOAL_WHOLE_MARKET_PCT_CORE,
            "goal_us_per_frame": GOAL_CPU_US,
            "broker_us_per_frame": {
                _load(r["target_fps"]): r["broker"]["cpu_us_per_frame"] for r in wm
            },
            "met_us_per_frame_at": [
                _load(r["target_fps"])
                for r in wm
                if (r["broker"]["cpu_us_per_frame"] or float("inf")) <= GOAL_CPU_US
            ],
            "goal_library_vs_redis_py": GOAL_LIBRARY_VS_REDIS_PY,
            "library_vs_redis_py": ratios,
            "met_library": all(
                v is not None and v <= GOAL_LIBRARY_VS_REDIS_PY for v in ratios.values()
            ),
        }
        floors = [r for r in wm if r.get("floor")]
        if floors:
            # The least any broker pays for the same frames here: receive, route, one PUBLISH
            # write a read (records before it have none).
            out["whole_market"]["floor_pct_core"] = {
                _load(r["target_fps"]): r["floor"].get("cpu_pct_core") for r in floors
            }
            out["whole_market"]["floor_pct_core_at_real_rate"] = real.get("floor", {}).get(
                "cpu_pct_core"
            )
            out["whole_market"]["broker_beyond_floor_us_per_frame"] = {
                _load(r["target_fps"]): r.get("broker_beyond_floor_us_per_frame") for r in floors
            }
    lat_runs = record.get("latency", {}).get("runs", [])
    lat = [r for r in lat_runs if r["target_fps"] == 1000]
    if lat:
        out["added_p99_us_at_1k"] = _added_goal(lat[0], GOAL_ADDED_P99_US)
    # Issue 16's goals, each beside this machine's floor (records before the floor path have
    # neither: they print as they did).
    if any("floor" in r for r in lat_runs):
        out["added_p99_us_issue16"] = {
            _load(r["target_fps"]): _added_goal(r, GOAL_ISSUE16_ADDED_P99_US[r["target_fps"]])
            for r in lat_runs
            if r["target_fps"] in GOAL_ISSUE16_ADDED_P99_US
        }
    gw = record.get("gateway")
    if gw:
        out.update(_gateway_summary(gw))
    return out


def _added_goal(run: dict[str, Any], goal: float) -> dict[str, Any]:
    """One latency run's added p99 against ``goal`` (us), and the floor's when it has one."""
    added = run["added_p99_us"]
    disturbed = max(
        run["broker"].get("other_load_cores", 0.0),
        run["direct"].get("other_load_cores", 0.0),
    )
    out: dict[str, Any] = {
        "goal": goal,
        "value": added,
        "met": added < goal,
        # Another load on the machine during either window makes the comparison unsound.
        "other_load_cores": disturbed,
        "conclusive": disturbed < 0.25,
    }
    if "floor" in run:
        # The least any process between the simulator and Redis adds here (None: the floor
        # window failed): a goal under it cannot be met on this machine.
        floor = (run.get("floor_added") or {}).get("p99_us")
        out["floor_value"] = floor
        out["floor_met"] = floor < goal if floor is not None else None
        out["floor_other_load_cores"] = run["floor"].get("other_load_cores")
    return out


def _added_line(label: str, a: dict[str, Any]) -> str:
    """A goal line of the latency the broker adds, with the floor's figure when it has one."""
    verdict = "met" if a["met"] else "NOT met"
    if not a.get("conclusive", True):
        verdict = f"inconclusive, {a['other_load_cores']:.2f} cores of other load"
    figures = f"{a['value']:.0f} us"
    if "floor_value" in a:
        floor = a["floor_value"]
        figures += "; this machine's floor: " + ("-" if floor is None else f"{floor:.0f} us")
        others = a.get("floor_other_load_cores") or 0.0
        if floor is not None and others >= 0.25:
            figures += f" with {others:.2f} cores of other load"
    return f"  {label}: {verdict} ({figures})"


def _latency_row(rate: str, path: str, p: dict[str, Any]) -> str:
    return (
        f"  {rate:>6} {path:<7} {_f(p['p50_us'], '.0f'):>7} "
        f"{_f(p['p99_us'], '.0f'):>7} {_f(p['p999_us'], '.0f'):>7} "
        f"{_f(p['max_us'], '.0f'):>7} {p['frames']:>7} "
        f"{p.get('other_load_cores', 0.0):>6.2f}"
    )


def _added_row(p50: float, p99: float, p999: float) -> str:
    return f"  {'':>6} {'added':<7} {p50:>7.0f} {p99:>7.0f} {p999:>7.0f}"


def _gw_label(r: dict[str, Any]) -> str:
    return f"{_load(r['target_fps'])} x{r['clients']}"


def _gateway_summary(gw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [*gw.get("fanout", []), *([gw["many"]] if gw.get("many") else [])]
    if runs:
        per_core = {_gw_label(r): r.get("client_frames_per_s_per_core") for r in runs}
        goal = GOAL_GATEWAY_CLIENT_FRAMES_PER_CORE
        out["gateway_client_frames_per_core"] = {
            "goal": goal,
            "by_run": per_core,
            "us_per_client_frame": {_gw_label(r): r.get("us_per_client_frame") for r in runs},
            "met_at": [k for k, v in per_core.items() if v is not None and v >= goal],
            "best": max((v for v in per_core.values() if v is not None), default=None),
        }
    lat = gw.get("latency")
    if lat and "added_per_frame" in lat:
        # per frame: the gateway client's receive time minus the Redis subscriber's
        added = lat["added_per_frame"].get("p99_us", float("nan"))
        disturbed = max(lat[p].get("other_load_cores", 0.0) for p in ("gateway", "direct"))
        out["gateway_added_p99_us_at_1k"] = {
            "goal": GOAL_GATEWAY_ADDED_P99_US,
            "value": added,
            "met": added < GOAL_GATEWAY_ADDED_P99_US,
            "difference_of_p99s": lat.get("added_over_broker_p99_us"),
            "over_direct": lat.get("added_over_direct_p99_us"),
            "other_load_cores": disturbed,
            "conclusive": disturbed < 0.25,
        }
    return out


def table(record: dict[str, Any]) -> str:
    m = record["machine"]
    v = m["versions"]
    lines = [
        f"upbit-broker benchmarks ({record['mode']}), {record['started']}",
        f"machine: {m['cpu_model']}, {m['cpus']} cpus, {_mb(m['memory_bytes'])} MB; "
        f"python {v.get('python')}, redis-server {v.get('redis-server', '?')}, "
        f"redis-py {v.get('redis', '?')}, websockets {v.get('websockets', '?')}; git {m['git']}",
    ]
    tp = record.get("throughput")
    if tp:
        lines += [
            "",
            "1. Throughput (200 codes x ticker/trade/orderbook, DEFAULT; window "
            f"{tp['duration_s']:g} s)",
        ]
        lines.append(
            f"  {'offered':>8} {'cons':>8} {'offered/s':>10} {'delivered/s':>11} {'loss':>5} "
            f"{'broker us/frame':>15} {'bare ws':>7} {'own':>5} {'broker cores':>12} "
            f"{'RSS MB':>6} {'ours':>5} {'others':>6} sat"
        )
        for r in tp["runs"]:
            cons = f"{r['consumers']}" + ("" if r["consumer_mode"] == "hiredis" else " r-py")
            lines.append(
                f"  {_load(r['target_fps']):>8} {cons:>8} {r['offered_fps']:>10.0f} "
                f"{r['delivered_fps']:>11.0f} {r['loss']:>5} "
                f"{r['broker_cpu_us_per_frame']:>15.1f} "
                f"{_f(r.get('bare_client_cpu_us_per_frame')):>7} "
                f"{_f(r.get('broker_own_cpu_us_per_frame')):>5} {r['broker_cpu_cores']:>12.3f} "
                f"{_mb(r['broker_rss_bytes']):>6} {r['machine_cpu_cores_used']:>5.2f} "
                f"{r.get('other_load_cores', 0):>6.2f} {'yes' if r['saturated'] else 'no'}"
            )
    rp = record.get("throughput_redis_py")
    if rp:
        lines += ["", "1b. Same, broker publishing through redis-py pipelines (the old road)"]
        for r in rp["runs"]:
            lines.append(
                f"  {_load(r['target_fps']):>8} {r['consumers']:>8} {r['offered_fps']:>10.0f} "
                f"{r['delivered_fps']:>11.0f} {r['loss']:>5} "
                f"{r['broker_cpu_us_per_frame']:>15.1f} {r['broker_cpu_cores']:>12.3f}"
            )
    lat = record.get("latency")
    if lat:
        lines += ["", "2. Latency, simulator send -> consumer receive (us)"]
        lines.append(
            f"  {'rate':>6} {'path':<7} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'frames':>7}"
            f" {'others':>6}"
        )
        for r in lat["runs"]:
            rate = _load(r["target_fps"])
            for path in ("direct", "broker"):
                lines.append(_latency_row(rate, path, r[path]))
            lines.append(_added_row(r["added_p50_us"], r["added_p99_us"], r["added_p999_us"]))
            floor = r.get("floor")
            if floor is None:  # a record before the floor path
                continue
            if "error" in floor:
                lines.append(f"  {rate:>6} {'floor':<7} {floor['error']}")
                continue
            lines.append(_latency_row(rate, "floor", floor))
            if r.get("floor_added"):
                fa = r["floor_added"]
                lines.append(_added_row(fa["p50_us"], fa["p99_us"], fa["p999_us"]))
        if any("floor" in r for r in lat["runs"]):
            lines += [
                "  added: the path above minus direct. floor: the least a broker of these parts "
                "adds here,",
                "  simulator -> a process that only receives, routes, PUBLISHes -> Redis -> the "
                "same subscriber",
            ]
    rs = record.get("resubscribe")
    if rs:
        i, c = rs["idle"], rs["churn"]
        lines += [
            "",
            "3. Resubscribe",
            f"  idle: lease write -> simulator holds the set: p50 {i['p50_ms']} ms, "
            f"max {i['max_ms']} ms ({i['changes']} changes)",
            f"  churn: {c['lease_writes']} lease writes in {c['seconds']} s "
            f"({c['writes_per_s']}/s) -> {c['upstream_requests']} upstream messages; "
            f"max {c['max_requests_in_1s']} in 1 s, {c['max_requests_in_60s']} in 60 s "
            f"(Upbit: 5/s, 100/min; within: {c['within_limits']}); refused by simulator: "
            f"{c['rate_limited_by_sim']}",
            f"  final set exact: {c['final_set_exact']} ({c['final_streams']} streams), "
            f"{_f(c['converged_ms_after_last_write'])} ms after the last write",
        ]
    rc = record.get("recovery")
    if rc:
        d, k = rc["drop"], rc["leader_kill"]
        lines += [
            "",
            "4. Recovery (1k frames/s)",
            f"  /_sim/drop -> data again: p50 {_f(d['p50_ms'])} ms, max {_f(d['max_ms'])} ms "
            f"({d['recovered']}/{d['drops']} drops; reconnect backoff from "
            f"{d['backoff_initial_s']} s)",
            f"  SIGKILL leader -> standby publishes: {_f(k['takeover_ms'])} ms "
            f"(leader_ttl {k['leader_ttl_s']} s; takeover gap event: {k['gap_event']})",
        ]
    sc = record.get("scale")
    if sc:
        p = sc["pure"]
        lines += [
            "",
            f"5. Scale: {sc['leases']} leases over {sc['codes']} codes ({sc['streams']} streams)",
            f"  union upstream {sc['union_upstream_ms_after_last_write']} ms after the last of "
            f"the writes ({sc['write_all_leases_ms']} ms to write them); one more lease: "
            f"{sc['one_more_lease_ms']} ms",
            f"  broker RSS {_mb(sc['broker_rss_before_bytes'])} -> "
            f"{_mb(sc['broker_rss_after_bytes'])} MB; pure steps: list+parse "
            f"{p['list_and_parse_leases_ms']} ms, union {p['union_ms']} ms, request "
            f"{p['build_request_ms']} ms ({p['request_bytes']} bytes)",
        ]
        hb = sc.get("heartbeats")
        if hb:
            lines.append(
                f"  every lease renewed each 10/3 s ({hb['renewals_per_s']:.0f} renewals/s): "
                f"broker {hb['broker_cpu_cores']:.3f} cores"
            )
    ce = record.get("ceilings")
    if ce:
        rp_, ws = ce["redis_publish"], ce["websocket_receive"]
        lines += [
            "",
            "6. Ceilings (same run)",
            f"  Redis PUBLISH: {rp_['publish_per_s']:.0f}/s ({rp_['tool']}, "
            f"{rp_['payload_bytes']}-byte payloads)",
        ]
        if ws.get("frames_per_s"):
            lines.append(
                f"  bare websocket client on the simulator: {ws['frames_per_s']:.0f} frames/s "
                f"({_f(ws['client_cpu_us_per_frame'])} us/frame; limited by {ws['limited_by']})"
            )
        else:
            lines.append(f"  bare websocket client: {ws.get('error', 'no figure')}")
        s = record.get("summary", {})
        if "fraction_of_lower_ceiling" in s:
            lines.append(
                f"  broker best delivered {s['max_delivered_fps']:.0f}/s = "
                f"{s['fraction_of_lower_ceiling']:.0%} of the lower ceiling"
            )
    hp = record.get("hotpath")
    if hp:
        lines += [
            "",
            f"7. Hot path, in-process (ns/frame; mean frame {hp['mean_frame_bytes']:.0f} B)",
            f"  route_frame {hp['route_frame_ns']:.0f}; receive loop (route+lookup+append) "
            f"{hp['receive_loop_ns']:.0f}; pack per frame, bursts of 10/100/1000: raw RESP "
            + "/".join(f"{x:.0f}" for x in hp["pack_resp_ns"].values())
            + ", redis-py "
            + "/".join(f"{x:.0f}" for x in hp["pack_redis_py_ns"].values()),
            f"  route + enqueue + pack (bursts of 100): {hp['hot_path_ns']:.0f} ns "
            f"(redis-py: {hp['hot_path_redis_py_ns']:.0f} ns)",
        ]
    cf = record.get("cryptofeed")
    if cf:
        lines += ["", "8. Side by side with cryptofeed (trade+orderbook, SIMPLE, 200 codes)"]
        if cf.get("skipped"):
            lines.append(f"  not run: {cf['skipped']}")
        if cf.get("runs"):
            lines.append(
                f"  {'offered':>8} {'system':<13} {'offered/s':>10} {'handled/s':>10} "
                f"{'us/frame':>9} {'cores':>6} {'RSS MB':>7} {'peak MB':>7} keeps up"
            )
        for run in cf.get("runs", []):
            for key in ("broker", "cryptofeed"):
                r = run[key]
                lines.append(
                    f"  {_load(run['target_fps']):>8} {r['system']:<13} {r['offered_fps']:>10.0f} "
                    f"{r['handled_fps']:>10.0f} {_f(r['cpu_us_per_frame']):>9} "
                    f"{r['cpu_cores']:>6.3f} {_mb(r['rss_bytes']):>7} "
                    f"{_mb(r['peak_rss_bytes']):>7} {'yes' if r.get('keeps_up') else 'no':>8}"
                )
    wm = record.get("wholemarket")
    if wm:
        lines += ["", *_whole_market_lines(wm)]
    hist = record.get("history")
    if hist:
        lines += ["", *_history_lines(hist)]
    gw = record.get("gateway")
    if gw:
        lines += ["", *_gateway_lines(gw)]
    rep = record.get("replicas")
    if rep:
        lines += ["", *_replicas_lines(rep)]
    clu = record.get("cluster")
    if clu:
        lines += ["", *_cluster_lines(clu)]
    s = record.get("summary", {})
    if s:
        lines += ["", "Goals"]
        if "cpu_us_per_frame" in s:
            g = s["cpu_us_per_frame"]
            lines.append(
                f"  broker CPU <= {g['goal']:g} us/frame: met at "
                f"{', '.join(g['met_at']) or 'no load'}"
            )
            if g.get("frames_per_s_per_core"):
                goal, got = g["goal_frames_per_s_per_core"], g["frames_per_s_per_core"]
                lines.append(
                    f"  capacity >= {goal:,} frames/s per core: "
                    f"{'met' if got >= goal else 'NOT met'} ({got:,} at the best load)"
                )
            if g.get("broker_own_by_load"):
                own = ", ".join(
                    f"{k} {v:g}" for k, v in g["broker_own_by_load"].items() if v is not None
                )
                lines.append(f"  broker beyond a bare websockets client, us/frame: {own}")
        if "zero_loss_below_saturation" in s:
            z = s["zero_loss_below_saturation"]
            lines.append(
                f"  zero loss below saturation: {'met' if z['met'] else 'NOT met'} "
                f"({z['runs_below_saturation']} runs below saturation)"
            )
        if "whole_market" in s:
            w = s["whole_market"]
            pct = ", ".join(f"{k} {v:g}%" for k, v in w["broker_pct_core"].items())
            floor = w.get("floor_pct_core_at_real_rate")
            if floor is not None:
                pct += f"; this machine's floor: {floor:g}%"
            lines.append(
                f"  whole market, broker <= {w['goal_broker_pct_core']:g}% of a core at the real "
                f"rate: {'met' if w['met_pct_core'] else 'NOT met'} ({pct})"
            )
            us = ", ".join(f"{k} {_f(v)}" for k, v in w["broker_us_per_frame"].items())
            lines.append(
                f"  whole market, broker <= {w['goal_us_per_frame']:g} us/frame: met at "
                f"{', '.join(w['met_us_per_frame_at']) or 'no rate'} ({us})"
            )
            if w.get("broker_beyond_floor_us_per_frame"):
                beyond = ", ".join(
                    f"{k} {_f(v)}" for k, v in w["broker_beyond_floor_us_per_frame"].items()
                )
                lines.append(
                    f"  whole market, broker beyond this machine's floor, us/frame: {beyond}"
                )
            ratio = ", ".join(f"{k} {_f(v, '.2f')}x" for k, v in w["library_vs_redis_py"].items())
            lines.append(
                f"  consumer library within {w['goal_library_vs_redis_py']:g}x of bare redis-py: "
                f"{'met' if w['met_library'] else 'NOT met'} ({ratio})"
            )
        if "added_p99_us_at_1k" in s:
            lines.append(_added_line("added p99 < 1 ms at 1k frames/s", s["added_p99_us_at_1k"]))
        for rate, a in s.get("added_p99_us_issue16", {}).items():
            label = f"added p99 < {a['goal'] / 1000:g} ms at {rate} frames/s (issue 16)"
            lines.append(_added_line(label, a))
        if "gateway_client_frames_per_core" in s:
            g = s["gateway_client_frames_per_core"]
            lines.append(
                f"  gateway >= {g['goal']:,} client-frames/s per core: met at "
                f"{', '.join(g['met_at']) or 'no run'} (best {_f(g['best'], ',')})"
            )
        if "gateway_added_p99_us_at_1k" in s:
            a = s["gateway_added_p99_us_at_1k"]
            verdict = "met" if a["met"] else "NOT met"
            if not a.get("conclusive", True):
                verdict = f"inconclusive, {a['other_load_cores']:.2f} cores of other load"
            lines.append(
                f"  gateway adds < 1 ms p99 over the broker path at 1k frames/s: {verdict} "
                f"({a['value']:.0f} us per frame; p99 vs p99 "
                f"{_f(a['difference_of_p99s'], '+.0f')} us, over direct "
                f"{_f(a['over_direct'], '+.0f')} us)"
            )
    return "\n".join(lines)


def _whole_market_lines(wm: dict[str, Any]) -> list[str]:
    runs = wm.get("runs", [])
    streams = runs[0]["streams"] if runs else len(wm.get("types", ())) * wm.get("codes", 0)
    clock = runs[0]["broker"].get("clock", "stat") if runs else "stat"
    # The machine's floor (route + one PUBLISH write a read): columns only when measured.
    with_floor = any(r.get("floor") for r in runs)
    floor_head = f" {'floor %core':>11} {'us/frame':>8} {'beyond':>6}" if with_floor else ""
    lines = [
        f"9. Whole market ({wm['codes']} codes x ticker/trade/orderbook = {streams} streams, "
        f"DEFAULT; window {wm['duration_s']:g} s, CPU from {clock})",
        f"  {'offered':>8} {'offered/s':>10} {'delivered/s':>11} {'loss':>5} "
        f"{'broker %core':>12} {'us/frame':>8} {'bare ws %core':>13} {'us/frame':>8} "
        f"{'own':>5}{floor_head} {'others':>6} sat",
    ]
    for r in runs:
        b, bare = r["broker"], r.get("bare_client", {})
        floor_cells = ""
        if with_floor:
            fl = r.get("floor") or {}
            floor_cells = (
                f" {_f(fl.get('cpu_pct_core'), '.2f'):>11} {_f(fl.get('cpu_us_per_frame')):>8} "
                f"{_f(r.get('broker_beyond_floor_us_per_frame')):>6}"
            )
        lines.append(
            f"  {_load(r['target_fps']):>8} {r['offered_fps']:>10.0f} {r['delivered_fps']:>11.0f} "
            f"{r['loss']:>5} {_f(b['cpu_pct_core'], '.2f'):>12} {_f(b['cpu_us_per_frame']):>8} "
            f"{_f(bare.get('cpu_pct_core'), '.2f'):>13} {_f(bare.get('cpu_us_per_frame')):>8} "
            f"{_f(r.get('broker_own_us_per_frame')):>5}{floor_cells} "
            f"{r.get('other_load_cores', 0):>6.2f} {'yes' if r['saturated'] else 'no'}"
        )
    if with_floor:
        lines.append(
            "  own: broker us/frame beyond the bare websockets client; floor: the broker's "
            "upstream adapter on uvloop,"
        )
        lines.append(
            "  route_frame on every frame and one write a read of a PUBLISH per frame (no "
            "leases, no cache); beyond: broker - floor"
        )
        disturbed = [
            f"{_load(r['target_fps'])} {part} {o:.2f}"
            for r in runs
            for part, o in (
                ("bare ws", r.get("bare_client", {}).get("other_load_cores")),
                ("floor", (r.get("floor") or {}).get("other_load_cores")),
            )
            if o is not None and o >= 0.05
        ]
        if disturbed:
            lines.append(f"  other load (cores) in those windows: {', '.join(disturbed)}")
        errors = [
            f"{_load(r['target_fps'])}: {r['floor']['error']}"
            for r in runs
            if (r.get("floor") or {}).get("error")
        ]
        lines += [f"  floor error {e}" for e in errors]
    lines.append("  consumer process CPU, us/frame (same channels, same window, side by side):")
    lines.append(
        f"  {'offered':>8} {'library':>8} {'redis-py asyncio':>16} {'ratio':>6} "
        f"{'hiredis':>8} {'library gaps':>12}"
    )
    for r in runs:
        c = r["consumers"]
        lines.append(
            f"  {_load(r['target_fps']):>8} {_f(c['library']['cpu_us_per_frame']):>8} "
            f"{_f(c['redis-py-async']['cpu_us_per_frame']):>16} "
            f"{_f(r.get('library_vs_redis_py'), '.2f'):>6} "
            f"{_f(c['hiredis']['cpu_us_per_frame']):>8} {c['library'].get('gaps', '-'):>12}"
        )
    return lines


def _history_lines(hist: dict[str, Any]) -> list[str]:
    """The history section: CPU per frame on/off, memory per retained frame, latency."""
    lines = ["History (XADD beside every PUBLISH)"]
    cpu = hist.get("cpu", {})
    if cpu.get("runs"):
        lines.append("     load  off us/frame  on us/frame  ratio  goal")
        for r in cpu["runs"]:
            lines.append(
                f"  {_load(r['target_fps']):>7} {_f(r['off']['broker_cpu_us_per_frame']):>13} "
                f"{_f(r['on']['broker_cpu_us_per_frame']):>12} {_f(r['ratio'], '.2f'):>6}  "
                f"<= {cpu['goal_ratio']:g}x {'met' if r['met'] else 'NOT met'}"
            )
    for type_, m in hist.get("memory", {}).items():
        lines.append(
            f"  memory, {type_}: {_mb(m['memory_usage_bytes'])} MB per 10k retained frames of "
            f"{m['frame_bytes']} B ({m['overhead_per_entry']:+.0f} B an entry; default cap "
            f"{m['default_cap']:,} per code)"
        )
    lat = hist.get("latency")
    if lat:
        for path in ("pubsub", "durable"):
            if path in lat:
                p = lat[path]
                lines.append(
                    f"  latency, {path}: p50 {_f(p['p50_us'], '.0f')} us, "
                    f"p99 {_f(p['p99_us'], '.0f')} us ({p['frames']} frames, "
                    f"{p['missing']} missing)"
                )
    return lines


def _gateway_lines(gw: dict[str, Any]) -> list[str]:
    """The gateway section: CPU per client-frame by fan-out, latency, many clients."""
    lines = [
        "10. Gateway: Upbit's protocol to raw WebSocket clients (200 codes x "
        f"ticker/trade/orderbook, DEFAULT; window {gw['duration_s']:g} s)",
        f"  {'offered':>8} {'clients':>7} {'streams':>7} {'offered/s':>9} {'client fr/s':>11} "
        f"{'us/client fr':>12} {'per core':>9} {'gw cores':>8} {'clients':>7} {'RSS MB':>6} "
        f"{'others':>6} sat",
    ]
    runs = [*gw.get("fanout", []), *([gw["many"]] if gw.get("many") else [])]
    for r in runs:
        lines.append(
            f"  {_load(r['target_fps']):>8} {r['clients']:>7} {r['streams_per_client']:>7} "
            f"{r['offered_fps']:>9.0f} {r['client_frames_per_s']:>11.0f} "
            f"{_f(r['us_per_client_frame'], '.2f'):>12} "
            f"{_f(r['client_frames_per_s_per_core'], ',.0f'):>9} {r['gateway_cpu_cores']:>8.3f} "
            f"{r['client_cpu_cores']:>7.3f} {_mb(r['gateway_rss_bytes']):>6} "
            f"{r.get('other_load_cores', 0):>6.2f} {'yes' if r['saturated'] else 'no'}"
        )
    lat = gw.get("latency")
    if lat:
        lines.append(
            f"  latency at {_load(lat['target_fps'])} frames/s, simulator send -> client "
            "receive (us):"
        )
        lines.append(
            f"  {'path':<8} {'p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7} {'frames':>7} "
            f"{'missing':>7} {'others':>6}"
        )
        for path in ("direct", "broker", "gateway"):
            p = lat[path]
            lines.append(
                f"  {path:<8} {_f(p['p50_us'], '.0f'):>7} {_f(p['p99_us'], '.0f'):>7} "
                f"{_f(p['p999_us'], '.0f'):>7} {_f(p['max_us'], '.0f'):>7} {p['frames']:>7} "
                f"{p['missing']:>7} {p.get('other_load_cores', 0.0):>6.2f}"
            )
        per = lat.get("added_per_frame", {})
        lines.append(
            f"  gateway over the broker path, per frame: p50 {_f(per.get('p50_us'), '.0f')}, "
            f"p99 {_f(per.get('p99_us'), '.0f')}, p99.9 {_f(per.get('p999_us'), '.0f')}, max "
            f"{_f(per.get('max_us'), '.0f')} (its receive minus the subscriber's, same frame)"
        )
        lines.append(
            f"  percentile vs percentile: over the broker path p50 "
            f"{lat['added_over_broker_p50_us']:+.0f}, p99 {lat['added_over_broker_p99_us']:+.0f}, "
            f"p99.9 {lat['added_over_broker_p999_us']:+.0f}; over direct p50 "
            f"{lat['added_over_direct_p50_us']:+.0f}, p99 {lat['added_over_direct_p99_us']:+.0f}"
        )
        tries = lat.get("attempts", [])
        if len(tries) > 1:
            others = ", ".join(f"{a['other_load_cores']:.2f}" for a in tries)
            lines.append(
                f"  (the least disturbed of {len(tries)} latency runs; other load in each: "
                f"{others} cores)"
            )
    many = gw.get("many")
    if many:
        lat_m, brk = many.get("latency", {}), many.get("broker_path_latency", {})
        lines.append(
            f"  {many['clients']} clients on one gateway ({many['streams_per_client']} streams "
            f"each): connected in {many['connect_all_s']:g} s "
            f"({_f(many.get('gateway_cpu_connect_ms_per_client'), '.1f')} ms of gateway CPU "
            f"each); RSS {_mb(many['gateway_rss_idle_bytes'])} -> "
            f"{_mb(many['gateway_rss_bytes'])} MB ({many['rss_per_client_bytes'] / 1024:.0f} KB "
            "a client)"
        )
        lines.append(
            f"  send -> receive over all {_f(lat_m.get('frames'), ',')} client-frames: p50 "
            f"{_f(lat_m.get('p50_us'), '.0f')}, p99 {_f(lat_m.get('p99_us'), '.0f')} us "
            f"(broker path, same window: p50 {_f(brk.get('p50_us'), '.0f')}, p99 "
            f"{_f(brk.get('p99_us'), '.0f')} us); clients closed by the gateway: "
            f"{sum(many['closed_by_gateway'].values())}"
        )
        per = many.get("added_per_frame", {})
        if per.get("frames"):
            lines.append(
                f"  the gateway's share, per client-frame (its receive minus the subscriber's): "
                f"p50 {_f(per.get('p50_us'), '.0f')}, p99 {_f(per.get('p99_us'), '.0f')} us"
            )
    return lines


def _kilo(n: Any) -> str:
    return f"{n / 1000:.0f}k" if isinstance(n, int | float) else "-"


def _cluster_lines(clu: dict[str, Any]) -> list[str]:
    """The Redis Cluster section (issue 15): one line per (consumers, way), then the two ways
    side by side."""
    runs = clu.get("runs", [])
    clock = runs[0].get("clock", "stat") if runs else "stat"
    lines = [
        f"12. Redis Cluster, sharded pub/sub: one broker, N hiredis consumers of every channel, "
        f"on one redis-server (PUBLISH/SUBSCRIBE) or a {clu['masters']}-master cluster "
        f"(SPUBLISH/SSUBSCRIBE, a connection per master) ({clu['codes']} codes x "
        f"{'/'.join(clu['types'])}, {_load(clu['target_fps'])} frames/s offered; window "
        f"{clu['duration_s']:g} s, CPU from {clock})",
        f"  {'cons':>4} {'on':<8} {'offered/s':>9} {'deliveries/s':>12} {'expected':>9} "
        f"{'loss':>5} {'broker us/fr':>12} {'redis cores (each)':<20} {'redis us/dlv':>12} "
        f"{'consumers':>9} {'busy':>5} {'others':>6} limited by",
    ]
    for r in runs:
        cores = "/".join(f"{c:.3f}" for c in r["redis_cores"].values())
        lines.append(
            f"  {r['consumers']:>4} {r['mode']:<8} {r['offered_fps']:>9.0f} "
            f"{r['deliveries_per_s']:>12.0f} {r['expected_deliveries_per_s']:>9.0f} "
            f"{r['loss']:>5} {_f(r['broker_cpu_us_per_frame']):>12} {cores:<20} "
            f"{_f(r['redis_us_per_delivery'], '.2f'):>12} {r['consumer_cores']:>9.3f} "
            f"{r['machine_cpu_cores_busy_all_processes']:>5.2f} "
            f"{r.get('other_load_cores', 0):>6.2f} {r['limited_by']}"
        )
    pairs = clu.get("compare", [])
    if pairs:
        lines.append(
            "  one redis vs the cluster, same N: deliveries/s, broker us/frame, busiest "
            "redis-server cores, all redis-servers' cores"
        )
        for c in pairs:
            d, b = c["deliveries_per_s"], c["broker_cpu_us_per_frame"]
            busy, total = c["busiest_redis_cores"], c["all_redis_cores"]
            lines.append(
                f"  {c['consumers']:>4}: {d[0]:.0f} -> {d[1]:.0f}; {_f(b[0])} -> {_f(b[1])} us; "
                f"{busy[0]:.3f} -> {busy[1]:.3f}; {total[0]:.3f} -> {total[1]:.3f}"
            )
    return lines


def _replicas_lines(rep: dict[str, Any]) -> list[str]:
    """The fan-out-from-replicas section (issue 15): one line per (consumers, way), then the
    two ways side by side."""
    runs = rep.get("runs", [])
    clock = runs[0].get("clock", "stat") if runs else "stat"
    lines = [
        f"11. Fan-out from replicas: one broker publishing to a master, N hiredis consumers on "
        f"the master or spread over {rep['replicas']} replicas ({rep['codes']} codes x "
        f"{'/'.join(rep['types'])}, {_load(rep['target_fps'])} frames/s offered; window "
        f"{rep['duration_s']:g} s, CPU from {clock})",
        f"  {'cons':>4} {'on':<8} {'offered/s':>9} {'deliveries/s':>12} {'expected':>9} "
        f"{'loss':>5} {'broker us/fr':>12} {'master':>6} {'repl 1':>6} {'repl 2':>6} "
        f"{'redis us/dlv':>12} {'dlv/core':>8} {'consumers':>9} {'us/dlv':>6} {'fr/wake':>7} "
        f"{'busy':>5} {'others':>6} limited by",
    ]
    for r in runs:
        redis = list(r["redis_cores"].values())
        cells = [*redis, *([None] * (3 - len(redis)))][:3]
        lines.append(
            f"  {r['consumers']:>4} {r['mode']:<8} {r['offered_fps']:>9.0f} "
            f"{r['deliveries_per_s']:>12.0f} {r['expected_deliveries_per_s']:>9.0f} "
            f"{r['loss']:>5} {_f(r['broker_cpu_us_per_frame']):>12} "
            + " ".join(f"{_f(c, '.3f'):>6}" for c in cells)
            + f" {_f(r['redis_us_per_delivery'], '.2f'):>12} "
            f"{_kilo(r.get('deliveries_per_redis_core')):>8} {r['consumer_cores']:>9.3f} "
            f"{_f(r.get('consumer_us_per_frame')):>6} {_f(r.get('consumer_frames_per_wakeup')):>7} "
            f"{r['machine_cpu_cores_busy_all_processes']:>5.2f} "
            f"{r.get('other_load_cores', 0):>6.2f} {r['limited_by']}"
        )
    pairs = rep.get("compare", [])
    if pairs:
        lines.append(
            "  master vs replicas, same N: deliveries/s, broker us/frame, busiest redis-server "
            "cores, all redis-servers' cores"
        )
        for c in pairs:
            d, b = c["deliveries_per_s"], c["broker_cpu_us_per_frame"]
            busy, total = c["busiest_redis_cores"], c["all_redis_cores"]
            lines.append(
                f"  {c['consumers']:>4}: {d[0]:.0f} -> {d[1]:.0f} "
                f"({_f(c['deliveries_ratio'], '.2f')}x); {_f(b[0])} -> {_f(b[1])} us; "
                f"{busy[0]:.3f} -> {busy[1]:.3f}; {total[0]:.3f} -> {total[1]:.3f}"
            )
    return lines
