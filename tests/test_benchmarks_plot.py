"""``python -m benchmarks --plot-only``: SVG charts drawn from a JSON record, nothing run.

A small fixture record (the shape ``python -m benchmarks`` writes, figures made up) becomes
valid SVG that ``xml.etree`` parses, with labelled axes, every series of the record and no
coordinate that is not a number. Also the whole-market lines of the text report.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks import plot, report

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def _throughput(target: float, broker_us: float, bare_us: float) -> dict[str, Any]:
    return {
        "target_fps": target,
        "consumers": 1,
        "consumer_mode": "hiredis",
        "codes": 200,
        "offered_fps": target * 0.99,
        "delivered_fps": target * 0.99,
        "loss": 0,
        "saturated": False,
        "broker_cpu_us_per_frame": broker_us,
        "broker_cpu_cores": broker_us * target / 1e6,
        "broker_rss_bytes": 50 << 20,
        "machine_cpu_cores_used": 0.2,
        "other_load_cores": 0.0,
        "bare_client_cpu_us_per_frame": bare_us,
        "broker_own_cpu_us_per_frame": broker_us - bare_us,
    }


def _latency_path(p50: float, with_cdf: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "frames": 8000,
        "p50_us": p50,
        "p99_us": p50 * 3,
        "p999_us": p50 * 8,
        "max_us": p50 * 10,
    }
    if with_cdf:
        out["cdf_us"] = [[p, p50 * (1 + p / 20)] for p in (0, 25, 50, 75, 90, 99, 99.9, 100)]
    return out


def _consumer(us: float) -> dict[str, Any]:
    return {"cpu_us_per_frame": us, "cpu_cores": us * 800 / 1e6, "loss": 0, "gaps": 0}


def _whole_market(target: float, broker_us: float, floor: tuple[float, float]) -> dict[str, Any]:
    floor_us, floor_pct = floor
    return {
        "target_fps": target,
        "streams": 2586,
        "offered_fps": target * 0.99,
        "delivered_fps": target * 0.99,
        "loss": 0,
        "saturated": False,
        "other_load_cores": 0.01,
        "broker": {
            "cpu_us_per_frame": broker_us,
            "cpu_pct_core": broker_us * target / 1e4,
            "clock": "schedstat",
        },
        "bare_client": {"cpu_us_per_frame": 30.0, "cpu_pct_core": 2.4},
        "broker_own_us_per_frame": broker_us - 30.0,
        "floor": {
            "cpu_us_per_frame": floor_us,
            "cpu_pct_core": floor_pct,
            "frames_per_s": target * 0.99,
            "other_load_cores": 0.0,
        },
        "broker_beyond_floor_us_per_frame": round(broker_us - floor_us, 2),
        "consumers": {
            "library": _consumer(44.3),
            "redis-py-async": _consumer(32.7),
            "hiredis": _consumer(18.1),
        },
        "library_vs_redis_py": 1.35,
    }


RECORD: dict[str, Any] = {
    "benchmark": "upbit-broker",
    "mode": "full",
    "started": "2026-12-05T00:10:00+0000",
    "machine": {
        "cpu_model": "AMD EPYC",
        "cpus": 2,
        "memory_bytes": 24 << 30,
        "git": "abc1234",
        "versions": {"python": "3.11.7", "redis": "8.2.0"},
    },
    "throughput": {
        "duration_s": 6.0,
        "runs": [
            _throughput(1000, 41.4, 23.3),
            _throughput(5000, 16.0, 8.0),
            _throughput(20000, 10.8, 7.8),
        ],
    },
    "latency": {
        "runs": [
            {
                "target_fps": 1000,
                "direct": _latency_path(344, True),
                "broker": _latency_path(544, True),
                "added_p50_us": 200,
                "added_p99_us": 600,
                "added_p999_us": 1600,
            },
            {  # an older record: percentiles only
                "target_fps": 10000,
                "direct": _latency_path(1448, False),
                "broker": _latency_path(2570, False),
                "added_p50_us": 1122,
                "added_p99_us": 3366,
                "added_p999_us": 8976,
            },
        ]
    },
    "cryptofeed": {
        "runs": [
            {
                "target_fps": 1000,
                "broker": {"offered_fps": 1001, "cpu_us_per_frame": 48.6},
                "cryptofeed": {"offered_fps": 1003, "cpu_us_per_frame": 194.2},
            }
        ]
    },
    "wholemarket": {
        "codes": 862,
        "types": ["ticker", "trade", "orderbook"],
        "duration_s": 25.0,
        "runs": [_whole_market(800, 72.3, (26.4, 2.11)), _whole_market(4000, 27.5, (8.7, 3.66))],
    },
}


def _numbers(svg: ET.Element) -> list[float]:
    """Every coordinate of the drawing (attributes and point lists)."""
    out = []
    for el in svg.iter():
        for name in ("x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "width", "height"):
            if name in el.attrib:
                out.append(float(el.attrib[name]))
        for pair in el.attrib.get("points", "").split():
            out += [float(v) for v in pair.split(",")]
    return out


def _texts(svg: ET.Element) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text")]


def test_plot_only_turns_a_record_into_valid_svg_charts(tmp_path: Path) -> None:
    record_path = tmp_path / "record.json"
    record_path.write_text(json.dumps(RECORD))
    out = tmp_path / "charts"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks", "--plot-only"),
            *("--output", str(record_path), "--plot-dir", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench-cpu-per-frame.svg", "bench-latency-cdf.svg", "bench-whole-market.svg"]
    for name in names:
        root = ET.parse(out / name).getroot()
        assert root.tag == f"{SVG}svg", name
        assert root.find(f"{SVG}title") is not None, name
        width, height = float(root.attrib["width"]), float(root.attrib["height"])
        numbers = _numbers(root)
        assert numbers and all(math.isfinite(v) for v in numbers), name
        # everything drawn lies on the canvas
        assert all(-1 <= v <= max(width, height) + 1 for v in numbers), name
        assert "run of 2026-12-05 00:10 (full), git abc1234" in " ".join(_texts(root)), name

    cpu = ET.parse(out / "bench-cpu-per-frame.svg").getroot()
    texts = _texts(cpu)
    assert "offered frames/s (log scale)" in texts and "CPU µs per frame (log scale)" in texts
    for label in ("upbit-broker (200 codes x 3 types)", "bare websockets client, same load"):
        assert label in texts
    assert "cryptofeed (trade+orderbook, SIMPLE)" in texts
    assert "upbit-broker, whole market (862 codes)" in texts
    assert {"1k", "5k", "20k"} <= set(texts)  # the x axis' ticks
    # one line per series with more than one point (cryptofeed has one run here)
    assert len(list(cpu.iter(f"{SVG}polyline"))) == 4

    cdf = ET.parse(out / "bench-latency-cdf.svg").getroot()
    texts = _texts(cdf)
    assert {"50%", "99%", "99.9%", "max"} <= set(texts)
    assert {"1k frames/s, broker", "1k frames/s, direct", "10k frames/s, broker"} <= set(texts)
    assert any("percentiles" in t or "p50/p99" in t for t in texts)  # the older run is flagged
    assert len(list(cdf.iter(f"{SVG}polyline"))) == 4

    wm = ET.parse(out / "bench-whole-market.svg").getroot()
    texts = _texts(wm)
    assert "CPU µs per frame" in texts and "% of one core" in texts
    assert {"72.3", "27.5", "44.3", "32.7", "18.1"} <= set(texts)  # the bars' values
    assert {"792 frames/s", "3,960 frames/s"} <= set(texts)
    assert {"goal 25", "goal 2%"} <= set(texts)
    # the machine's floor beside the bare client: its bars (two rates, two panels) and legend
    assert {"26.4", "8.7", "2.1", "3.7"} <= set(texts)
    assert plot.FLOOR_LABEL in texts
    assert len(_rects(wm, plot.GREY)) == 2 * 2 + 1


def _rects(svg: ET.Element, fill: str) -> list[ET.Element]:
    return [r for r in svg.iter(f"{SVG}rect") if r.attrib.get("fill") == fill]


def test_an_older_whole_market_record_without_the_floor_still_plots_and_prints() -> None:
    record = copy.deepcopy(RECORD)
    for run in record["wholemarket"]["runs"]:
        del run["floor"], run["broker_beyond_floor_us_per_frame"]
    wm = ET.fromstring(plot.whole_market(record) or "")
    texts = _texts(wm)
    assert {"72.3", "27.5", "44.3", "32.7", "18.1"} <= set(texts)
    assert plot.FLOOR_LABEL not in texts and "26.4" not in texts
    assert _rects(wm, plot.GREY) == []
    # the legend: one entry a series drawn, the floor's not among them
    assert len([t for t in texts if t in {s[0] for s in plot.WHOLE_MARKET_SERIES}]) == 5

    del record["cryptofeed"]
    record["summary"] = report.summary(record)
    assert "floor_pct_core" not in record["summary"]["whole_market"]
    text = report.table(record)
    assert "floor" not in text
    header = next(line for line in text.splitlines() if "broker %core" in line)
    assert header.split() == [
        *("offered", "offered/s", "delivered/s", "loss", "broker", "%core", "us/frame"),
        *("bare", "ws", "%core", "us/frame", "own", "others", "sat"),
    ]
    assert "NOT met (0.8k 5.784%, 4k 11%)\n" in text + "\n"


def test_a_record_without_a_section_gets_the_other_charts(tmp_path: Path) -> None:
    record = copy.deepcopy(RECORD)
    del record["wholemarket"], record["cryptofeed"]
    written = plot.write_charts(record, tmp_path)
    assert sorted(p.name for p in written) == ["bench-cpu-per-frame.svg", "bench-latency-cdf.svg"]
    assert "cryptofeed" not in (tmp_path / "bench-cpu-per-frame.svg").read_text()
    assert plot.write_charts({"machine": {}}, tmp_path / "none") == []


def test_the_report_has_the_whole_market_rows_and_goals() -> None:
    record = copy.deepcopy(RECORD)
    del record["cryptofeed"]  # the fixture has only what the charts read of it
    record["summary"] = report.summary(record)
    w = record["summary"]["whole_market"]
    assert w["broker_pct_core"] == {"0.8k": 5.784, "4k": 11.0}
    assert not w["met_pct_core"] and w["met_us_per_frame_at"] == []
    assert not w["met_library"]
    text = report.table(record)
    assert "9. Whole market (862 codes x ticker/trade/orderbook = 2586 streams" in text
    row = next(line for line in text.splitlines() if re.match(r"\s+0\.8k\s+792\s", line))
    assert "72.3" in row and "30.0" in row and "42.3" in row
    # the machine's floor beside the bare client, and the broker beyond it
    assert re.search(r"30\.0\s+42\.3\s+2\.11\s+26\.4\s+45\.9\s+0\.01 no$", row), row
    assert w["floor_pct_core_at_real_rate"] == 2.11
    assert w["broker_beyond_floor_us_per_frame"] == {"0.8k": 45.9, "4k": 18.8}
    assert "at the real rate: NOT met (0.8k 5.784%, 4k 11%; this machine's floor: 2.11%)" in text
    assert "whole market, broker beyond this machine's floor, us/frame: 0.8k 45.9, 4k 18.8" in text
    assert re.search(r"0\.8k\s+44\.3\s+32\.7\s+1\.35\s+18\.1", text)
    assert "consumer library within 1.2x of bare redis-py: NOT met (0.8k 1.35x, 4k 1.35x)" in text


#: section 2 of RECORD's table as printed before the floor path (a record without one prints it
#: so still)
LATENCY_WITHOUT_FLOOR = """\
2. Latency, simulator send -> consumer receive (us)
    rate path        p50     p99   p99.9     max  frames others
      1k direct      344    1032    2752    3440    8000   0.00
      1k broker      544    1632    4352    5440    8000   0.00
         added       200     600    1600
     10k direct     1448    4344   11584   14480    8000   0.00
     10k broker     2570    7710   20560   25700    8000   0.00
         added      1122    3366    8976
"""


def _with_latency_floor(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the latency benchmark's floor path in both runs (1k with its CDF, 10k
    from percentiles only and a disturbed window)."""
    record = copy.deepcopy(record)
    one, ten = record["latency"]["runs"]
    one["floor"] = {**_latency_path(400, True), "other_load_cores": 0.02, "loop": "uvloop"}
    one["floor_added"] = {"p50_us": 56.0, "p99_us": 168.0, "p999_us": 448.0}
    ten["floor"] = {**_latency_path(1500, False), "other_load_cores": 0.4, "loop": "uvloop"}
    ten["floor_added"] = {"p50_us": 52.0, "p99_us": 156.0, "p999_us": 416.0}
    return record


def _section(text: str, title: str) -> str:
    """The lines of ``text`` from ``title`` to the next blank line."""
    start = text.index(title)
    end = text.find("\n\n", start)
    return text[start : end + 1 if end >= 0 else len(text)]


def test_a_record_without_the_latency_floor_prints_and_plots_as_before() -> None:
    record = copy.deepcopy(RECORD)
    del record["cryptofeed"]
    record["summary"] = report.summary(record)
    assert "added_p99_us_issue16" not in record["summary"]
    assert "floor_value" not in record["summary"]["added_p99_us_at_1k"]
    text = report.table(record)
    assert _section(text, "2. Latency") == LATENCY_WITHOUT_FLOOR
    goals = text[text.index("\nGoals\n") :].splitlines()
    assert goals[-1] == "  added p99 < 1 ms at 1k frames/s: met (600 us)"
    assert not any("issue 16" in line for line in goals)

    cdf = ET.fromstring(plot.latency_cdf(record) or "")
    assert not any("floor" in t for t in _texts(cdf))
    assert [p.attrib["stroke"] for p in cdf.iter(f"{SVG}polyline")] == [
        *(plot.GREEN, plot.BLUE) * 2
    ]


def test_the_latency_floor_is_a_row_a_goal_figure_and_a_cdf() -> None:
    record = _with_latency_floor(RECORD)
    del record["cryptofeed"]
    record["summary"] = report.summary(record)
    s = record["summary"]
    assert s["added_p99_us_at_1k"]["floor_value"] == 168.0
    issue16 = s["added_p99_us_issue16"]
    assert list(issue16) == ["1k", "10k"]
    one, ten = issue16["1k"], issue16["10k"]
    assert (one["goal"], one["value"], one["met"]) == (500, 600, False)
    assert one["floor_value"] == 168.0 and one["floor_met"] is True
    assert (ten["goal"], ten["value"], ten["met"]) == (1000, 3366, False)
    assert ten["floor_value"] == 156.0 and ten["floor_other_load_cores"] == 0.4

    text = report.table(record)
    section = _section(text, "2. Latency").splitlines()
    # each run: direct, broker, its added line, then the floor and its own added line
    assert section[2:7] == [
        *LATENCY_WITHOUT_FLOOR.splitlines()[2:5],
        "      1k floor       400    1200    3200    4000    8000   0.02",
        "         added        56     168     448",
    ]
    assert section[10:12] == [
        "     10k floor      1500    4500   12000   15000    8000   0.40",
        "         added        52     156     416",
    ]
    assert section[12].startswith("  added: the path above minus direct. floor: the least")
    assert section[13].startswith("  simulator -> a process that only receives, routes")
    assert len(section) == 14
    goals = text[text.index("\nGoals\n") :].splitlines()
    assert goals[-3:] == [
        "  added p99 < 1 ms at 1k frames/s: met (600 us; this machine's floor: 168 us)",
        "  added p99 < 0.5 ms at 1k frames/s (issue 16): NOT met "
        "(600 us; this machine's floor: 168 us)",
        "  added p99 < 1 ms at 10k frames/s (issue 16): NOT met "
        "(3366 us; this machine's floor: 156 us with 0.40 cores of other load)",
    ]

    cdf = ET.fromstring(plot.latency_cdf(record) or "")
    texts = _texts(cdf)
    assert {"1k frames/s, floor", "10k frames/s, floor"} <= set(texts)
    assert any(t.startswith("floor: simulator") for t in texts)
    strokes = [p.attrib["stroke"] for p in cdf.iter(f"{SVG}polyline")]
    assert strokes == [*(plot.GREEN, plot.BLUE, plot.GREY) * 2]
    # the floor's CDF (1k, a full distribution) lies between direct's and the broker's
    lines = list(cdf.iter(f"{SVG}polyline"))
    first_x = [float(p.attrib["points"].split()[0].split(",")[0]) for p in lines[:3]]
    assert first_x[0] < first_x[2] < first_x[1]
    numbers = _numbers(cdf)
    assert all(math.isfinite(v) and -1 <= v <= 801 for v in numbers)


def test_a_failed_floor_window_is_said_and_not_drawn() -> None:
    record = _with_latency_floor(RECORD)
    del record["cryptofeed"]
    one = record["latency"]["runs"][0]
    one["floor"] = {"error": "the floor path did not finish: TimeoutError()"}
    del one["floor_added"]
    record["summary"] = report.summary(record)
    assert record["summary"]["added_p99_us_issue16"]["1k"]["floor_value"] is None
    text = report.table(record)
    assert "      1k floor   the floor path did not finish: TimeoutError()\n" in text
    goal = "added p99 < 0.5 ms at 1k frames/s (issue 16): NOT met"
    assert f"{goal} (600 us; this machine's floor: -)" in text
    cdf = ET.fromstring(plot.latency_cdf(record) or "")
    texts = _texts(cdf)
    assert "1k frames/s, floor" not in texts and "10k frames/s, floor" in texts
    # only the 10k run is drawn from percentiles (a failed floor is not flagged as such)
    assert any(t.startswith("10k: from p50/p99") for t in texts)
