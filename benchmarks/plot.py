"""SVG charts of a benchmark record: ``python -m benchmarks --plot`` (or ``--plot-only``).

Pure but for :func:`write_charts`: a record (the JSON of ``python -m benchmarks``) in, SVG text
out. Hand-written SVG because the lock has no plotting library, and the charts are simple:

* ``bench-cpu-per-frame.svg``: the broker's CPU per frame by offered rate (section 1), beside
  a bare websockets client on the same load and rate, and cryptofeed (section 8, with the
  broker on cryptofeed's load) when the record has it; both axes logarithmic.
* ``bench-latency-cdf.svg``: simulator send -> consumer receive, broker path against the
  direct connection and the machine's floor path when the record has it (section 2), as a CDF
  whose vertical axis stretches the tail (50%, 90%, 99%, 99.9% ... equally spaced), so p99 and
  p99.9 are as readable as the median.
* ``bench-whole-market.svg``: the whole-market row (section 9): CPU per frame and % of a core
  of the broker, the bare client, the machine's floor (when the record has it), the consumer
  library, bare redis-py asyncio and hiredis.

A chart whose section is missing from the record is not written (and not deleted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
BLUE, VERMILION, GREEN, PINK, ORANGE, SKY, GREY = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#777777",
)

Point = tuple[float, float]


# -- axes -----------------------------------------------------------------------------------------


def _num(v: float) -> str:
    """A tick label: 800, 1k, 4k, 20k, 0.5, 25."""
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 values from ``lo`` to ``hi`` (both already on the sequence)."""
    out = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**k
            if lo * 0.999 <= v <= hi * 1.001:
                out.append(float(f"{v:.6g}"))
    return out


def _snap_log(v: float, up: bool) -> float:
    """The nearest 1-2-5 value at or beyond ``v`` (upwards or downwards)."""
    k = math.floor(math.log10(v))
    steps = [m * 10.0**e for e in (k - 1, k, k + 1) for m in (1, 2, 5)]
    if up:
        return min(s for s in steps if s >= v * 0.999)
    return max(s for s in steps if s <= v * 1.001)


@dataclass
class Axis:
    """Data -> pixels along one axis (``start`` is the pixel of ``lo``)."""

    lo: float
    hi: float
    start: float
    end: float
    log: bool = False
    ticks: list[float] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    @classmethod
    def fit(cls, values: Iterable[float], start: float, end: float, *, log: bool) -> Axis:
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if not vals:
            vals = [1.0, 10.0] if log else [0.0, 1.0]
        lo, hi = min(vals), max(vals)
        if log:
            lo, hi = _snap_log(lo / 1.15, up=False), _snap_log(hi * 1.15, up=True)
            ticks = _log_ticks(lo, hi)
        else:
            lo = min(0.0, lo)
            step = _nice_step((hi - lo) / 5 or 1.0)
            hi = math.ceil(hi * 1.08 / step) * step
            ticks = [lo + i * step for i in range(round((hi - lo) / step) + 1)]
        return cls(lo, hi, start, end, log, ticks, [_num(t) for t in ticks])

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / (self.hi - self.lo)
        return self.start + f * (self.end - self.start)


def _nice_step(raw: float) -> float:
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


# -- the drawing ----------------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    points: list[Point]
    colour: str
    dash: str = ""
    marker: str = "circle"  # circle, square, diamond, triangle


class Svg:
    """An SVG document built element by element (text escaped, numbers rounded)."""

    def __init__(self, width: int, height: int, title: str) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family={quoteattr(FONT)} font-size="12" '
            f'role="img">',
            f"<title>{escape(title)}</title>",
            f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        ]

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(
        self,
        x: float,
        y: float,
        s: str,
        *,
        anchor: str = "start",
        size: int = 12,
        weight: str = "normal",
        fill: str = "#222222",
        rotate: bool = False,
    ) -> None:
        turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
            f'font-weight="{weight}" fill="{fill}"{turn}>{escape(s)}</text>'
        )

    def line(self, x1: float, y1: float, x2: float, y2: float, stroke: str, **attrs: Any) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke="{stroke}"{extra}/>'
        )

    def rect(self, x: float, y: float, w: float, h: float, fill: str) -> None:
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{fill}"/>')

    def marker(self, kind: str, x: float, y: float, colour: str, r: float = 4.0) -> None:
        if kind == "square":
            self.rect(x - r, y - r, 2 * r, 2 * r, colour)
        elif kind == "diamond":
            d = r * 1.3
            pts = f"{x:.1f},{y - d:.1f} {x + d:.1f},{y:.1f} {x:.1f},{y + d:.1f} {x - d:.1f},{y:.1f}"
            self.add(f'<polygon points="{pts}" fill="{colour}"/>')
        elif kind == "triangle":
            d = r * 1.25
            pts = f"{x:.1f},{y - d:.1f} {x + d:.1f},{y + d * 0.8:.1f} {x - d:.1f},{y + d * 0.8:.1f}"
            self.add(f'<polygon points="{pts}" fill="{colour}"/>')
        elif kind == "circle":
            self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="{colour}"/>')

    def polyline(self, points: Sequence[Point], colour: str, dash: str = "") -> None:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2" '
            f'stroke-linejoin="round"{dashed}/>'
        )

    def svg(self) -> str:
        return "\n".join([*self.parts, "</svg>"]) + "\n"


@dataclass
class Plot:
    """One plot area with its axes, inside an :class:`Svg`."""

    svg: Svg
    x: Axis
    y: Axis

    @property
    def left(self) -> float:
        return self.x.start

    @property
    def right(self) -> float:
        return self.x.end

    @property
    def top(self) -> float:
        return self.y.end

    @property
    def bottom(self) -> float:
        return self.y.start

    def axes(self, xlabel: str, ylabel: str, *, x_ticks: bool = True) -> None:
        s = self.svg
        for t, label in zip(self.y.ticks, self.y.labels, strict=True):
            y = self.y(t)
            s.line(self.left, y, self.right, y, "#e4e4e4")
            s.text(self.left - 6, y + 4, label, anchor="end", size=11, fill="#444444")
        if x_ticks:
            for t, label in zip(self.x.ticks, self.x.labels, strict=True):
                x = self.x(t)
                s.line(x, self.top, x, self.bottom, "#eeeeee")
                s.text(x, self.bottom + 16, label, anchor="middle", size=11, fill="#444444")
        s.line(self.left, self.bottom, self.right, self.bottom, "#333333")
        s.line(self.left, self.top, self.left, self.bottom, "#333333")
        s.text((self.left + self.right) / 2, self.bottom + 36, xlabel, anchor="middle")
        s.text(self.left - 46, (self.top + self.bottom) / 2, ylabel, anchor="middle", rotate=True)

    def series(self, series: Series) -> None:
        pts = [(self.x(x), self.y(y)) for x, y in sorted(series.points)]
        if len(pts) > 1:
            self.svg.polyline(pts, series.colour, series.dash)
        for x, y in pts:
            self.svg.marker(series.marker, x, y, series.colour)

    def goal(self, value: float, label: str, *, outside: bool = False) -> None:
        """A dashed line at ``value``, labelled above its right end (or beyond the plot)."""
        if not self.y.lo <= value <= self.y.hi:
            return
        y = self.y(value)
        self.svg.line(self.left, y, self.right, y, GREY, stroke_dasharray="6 4", stroke_width="1.5")
        if outside:
            self.svg.text(self.right + 5, y + 4, label, size=11, fill="#555555")
        else:
            self.svg.text(self.right - 4, y - 5, label, anchor="end", size=11, fill="#555555")


def _legend(svg: Svg, x: float, y: float, entries: Sequence[Series], note: str = "") -> None:
    for i, s in enumerate(entries):
        yy = y + i * 20
        svg.line(x, yy, x + 26, yy, s.colour, stroke_width="2", stroke_dasharray=s.dash or "none")
        svg.marker(s.marker, x + 13, yy, s.colour)
        svg.text(x + 34, yy + 4, s.label, size=11)
    if note:
        for j, line in enumerate(note.split("\n")):
            svg.text(x, y + len(entries) * 20 + 8 + j * 15, line, size=10, fill="#666666")


def _heading(svg: Svg, title: str, record: dict[str, Any]) -> None:
    svg.text(16, 24, title, size=15, weight="bold")
    svg.text(16, 42, _provenance(record), size=11, fill="#666666")


def _provenance(record: dict[str, Any]) -> str:
    m = record.get("machine", {})
    started = str(record.get("started", ""))[:16].replace("T", " ")
    cpu = f"{m.get('cpus', '?')} vCPU {m.get('cpu_model', '')}".strip()
    git = m.get("git", "?")
    end = record.get("git_at_end", {}).get("git")
    if end and end != git:  # the tree changed during the run: say both
        git = f"{git} at the start, {end} at the end"
    return f"run of {started} ({record.get('mode', '?')}), git {git}, {cpu}"


# -- the charts -----------------------------------------------------------------------------------


def cpu_per_frame(record: dict[str, Any]) -> str | None:
    """CPU per frame by offered rate: broker, bare websockets client, cryptofeed."""
    runs = [
        r
        for r in record.get("throughput", {}).get("runs", [])
        if r.get("target_fps") is not None
        and r.get("consumers") == 1
        and r.get("consumer_mode", "hiredis") == "hiredis"
    ]
    if not runs:
        return None
    codes = runs[0].get("codes", 200)
    series = [
        Series(
            f"upbit-broker ({codes} codes x 3 types)",
            [(r["offered_fps"], r["broker_cpu_us_per_frame"]) for r in runs],
            BLUE,
        ),
        Series(
            "bare websockets client, same load",
            [
                (r["offered_fps"], r["bare_client_cpu_us_per_frame"])
                for r in runs
                if r.get("bare_client_cpu_us_per_frame")
            ],
            GREEN,
            marker="square",
        ),
    ]
    cf = [r for r in record.get("cryptofeed", {}).get("runs", []) if "cryptofeed" in r]
    if cf:
        series.append(
            Series(
                "cryptofeed (trade+orderbook, SIMPLE)",
                [
                    (r["cryptofeed"]["offered_fps"], r["cryptofeed"]["cpu_us_per_frame"])
                    for r in cf
                    if r["cryptofeed"].get("cpu_us_per_frame")
                ],
                VERMILION,
                marker="triangle",
            )
        )
        series.append(
            Series(
                "upbit-broker on cryptofeed's load",
                [
                    (r["broker"]["offered_fps"], r["broker"]["cpu_us_per_frame"])
                    for r in cf
                    if r["broker"].get("cpu_us_per_frame")
                ],
                BLUE,
                dash="5 4",
                marker="diamond",
            )
        )
    wm = record.get("wholemarket", {}).get("runs", [])
    if wm:
        codes_wm = record["wholemarket"].get("codes")
        series.append(
            Series(
                f"upbit-broker, whole market ({codes_wm} codes)",
                [(r["offered_fps"], r["broker"]["cpu_us_per_frame"]) for r in wm],
                PINK,
                dash="2 3",
                marker="diamond",
            )
        )
        series.append(
            Series(
                "bare websockets client, whole market",
                [
                    (r["offered_fps"], r["bare_client"]["cpu_us_per_frame"])
                    for r in wm
                    if r.get("bare_client", {}).get("cpu_us_per_frame")
                ],
                GREEN,
                dash="2 3",
                marker="diamond",
            )
        )
    series = [s for s in series if s.points]
    svg = Svg(840, 440, "CPU per frame by offered rate")
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points] + [25.0]
    plot = Plot(svg, Axis.fit(xs, 80, 520, log=True), Axis.fit(ys, 370, 70, log=True))
    _heading(svg, "CPU per frame by offered rate (lower is better)", record)
    plot.axes("offered frames/s (log scale)", "CPU µs per frame (log scale)")
    plot.goal(25.0, "goal: 25 µs/frame")
    for s in series:
        plot.series(s)
    _legend(
        svg,
        540,
        90,
        series,
        "CPU time of each process over the\nwindow / frames it received. All on\n"
        f"{record.get('machine', {}).get('cpus', '?')} vCPUs: simulator, broker, Redis\n"
        "and the consumers (one in section 1,\nthree in the whole market).",
    )
    return svg.svg()


def _tail(p: float) -> float:
    """The CDF's vertical position of percentile ``p``: 0, 50, 90, 99, 99.9 ... equally apart."""
    return 4.5 if p >= 100 else -math.log10(1 - p / 100)


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and v > 0  # (NaN is not)


def latency_cdf(record: dict[str, Any]) -> str | None:
    """Latency CDF, broker path against direct (and the floor path), per offered rate."""
    runs = record.get("latency", {}).get("runs", [])
    if not runs:
        return None
    colours = {"broker": BLUE, "direct": GREEN, "floor": GREY}
    dashes = ["", "6 4", "2 3"]
    series: list[Series] = []
    from_percentiles: list[str] = []
    with_floor = False
    for i, run in enumerate(runs):
        for path in ("direct", "broker", "floor"):
            p = run.get(path, {})
            if path == "floor" and not _positive(p.get("p50_us")):
                continue  # older records have no floor path; a failed floor window no figures
            cdf = p.get("cdf_us")
            if not cdf:
                if _num(run["target_fps"]) not in from_percentiles:
                    from_percentiles.append(_num(run["target_fps"]))
                cdf = [
                    [q, p.get(k)]
                    for q, k in ((50, "p50_us"), (99, "p99_us"), (99.9, "p999_us"), (100, "max_us"))
                ]
            pts = [(v / 1000, _tail(q)) for q, v in cdf if v is not None and v > 0]
            if pts:
                label = f"{_num(run['target_fps'])} frames/s, {path}"
                marker = "none" if len(pts) > 8 else "circle"
                series.append(Series(label, pts, colours[path], dashes[i % 3], marker))
                with_floor |= path == "floor"
    if not series:
        return None
    svg = Svg(800, 440, "Latency, simulator send to consumer receive")
    xs = [p[0] for s in series for p in s.points]
    y = Axis(0.0, 4.5, 370, 70)
    y.ticks = [0.0, _tail(50), _tail(90), _tail(99), _tail(99.9), _tail(99.99), 4.5]
    y.labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "max"]
    plot = Plot(svg, Axis.fit(xs, 80, 520, log=True), y)
    _heading(svg, "Latency, simulator send -> consumer receive (CDF)", record)
    plot.axes("latency, ms (log scale)", "frames at or below (tail stretched)")
    for s in series:
        pts = sorted((plot.x(x), plot.y(yv)) for x, yv in s.points)
        # a CDF is a staircase: each percentile holds until the next latency
        steps = [pts[0]]
        for x, yy in pts[1:]:
            steps += [(x, steps[-1][1]), (x, yy)]
        svg.polyline(steps, s.colour, s.dash)
        for x, yy in pts if s.marker != "none" else ():
            svg.marker(s.marker, x, yy, s.colour, 3.0)
    note = "broker: simulator -> broker -> Redis -> a\nsubscriber process; direct: the same\n"
    note += "consumer on the simulator's socket."
    if with_floor:
        note += "\nfloor: simulator -> a process that only\nroutes and PUBLISHes -> Redis -> the\n"
        note += "same subscriber (this machine's least)."
    if from_percentiles:
        rates = ", ".join(from_percentiles)
        note += f"\n{rates}: from p50/p99/p99.9/max only\n(no full distribution in the record)."
    _legend(svg, 540, 90, series, note)
    return svg.svg()


FLOOR_LABEL = "machine floor: route + PUBLISH"
#: (label, colour, the figures of one process in one whole-market run)
WHOLE_MARKET_SERIES: tuple[tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ("upbit-broker", BLUE, lambda r: r["broker"]),
    ("bare websockets client", GREEN, lambda r: r.get("bare_client", {})),
    (FLOOR_LABEL, GREY, lambda r: r.get("floor") or {}),
    ("consumer library (messages())", PINK, lambda r: r["consumers"]["library"]),
    ("bare redis-py asyncio pub/sub", ORANGE, lambda r: r["consumers"]["redis-py-async"]),
    ("hiredis subscriber", SKY, lambda r: r["consumers"]["hiredis"]),
)


def _us_per_frame(fig: dict[str, Any]) -> float | None:
    v = fig.get("cpu_us_per_frame")
    return float(v) if v is not None else None


def _pct_core(fig: dict[str, Any]) -> float | None:
    if fig.get("cpu_pct_core") is not None:
        return float(fig["cpu_pct_core"])
    return 100 * fig["cpu_cores"] if fig.get("cpu_cores") is not None else None


def whole_market(record: dict[str, Any]) -> str | None:
    """The whole-market row: µs/frame and % of a core, by rate, side by side."""
    wm = record.get("wholemarket", {})
    runs = wm.get("runs", [])
    if not runs:
        return None
    svg = Svg(1100, 430, "The whole market: CPU per frame and % of a core")
    streams = runs[0].get("streams", 3 * wm.get("codes", 0))
    _heading(
        svg,
        f"Upbit's whole market: {wm.get('codes')} codes x ticker/trade/orderbook "
        f"({streams} streams), {wm.get('duration_s', 0):g}-s windows",
        record,
    )
    panels: tuple[tuple[str, Callable[[dict[str, Any]], float | None], float, str], ...] = (
        ("CPU µs per frame", _us_per_frame, 25.0, "goal 25"),
        ("% of one core", _pct_core, 2.0, "goal 2%"),
    )
    with_floor = any(r.get("floor") for r in runs)  # older records have no floor
    series = [s for s in WHOLE_MARKET_SERIES if with_floor or s[0] != FLOOR_LABEL]
    for i, (ylabel, value, goal, goal_label) in enumerate(panels):
        left = 80 + i * 410
        rows = [[value(get(r)) for _, _, get in series] for r in runs]
        ys = [v for row in rows for v in row if v is not None] + [goal]
        y = Axis.fit(ys, 390, 80, log=False)
        x = Axis(0.0, float(len(runs)), left, left + 300)
        plot = Plot(svg, x, y)
        plot.axes("", ylabel, x_ticks=False)
        plot.goal(goal, goal_label, outside=True)
        group = (x.end - x.start) / len(runs)
        bar = group * 0.8 / len(series)
        for g, (run, row) in enumerate(zip(runs, rows, strict=True)):
            x0 = x.start + g * group + group * 0.1
            for b, v in enumerate(row):
                if v is None:
                    continue
                colour = series[b][1]
                top = y(v)
                svg.rect(x0 + b * bar + 1, top, bar - 2, y.start - top, colour)
                svg.text(
                    x0 + (b + 0.5) * bar,
                    top - 4,
                    f"{v:.1f}" if v < 100 else f"{v:.0f}",
                    anchor="middle",
                    size=10,
                )
            svg.text(
                x.start + (g + 0.5) * group,
                y.start + 18,
                f"{run['offered_fps']:,.0f} frames/s",
                anchor="middle",
                size=11,
            )
    for j, (label, colour, _) in enumerate(series):
        svg.rect(880, 96 + j * 20 - 6, 12, 12, colour)
        svg.text(898, 96 + j * 20 + 4, label, size=11)
    clock = runs[0]["broker"].get("clock", "stat")
    floor_notes = (
        "Floor (measured as the bare",
        "client): the broker's upstream",
        "adapter, route_frame, one write",
        "a read of a PUBLISH per frame,",
        "nothing else (uvloop).",
    )
    notes = (
        "Broker and bare client: CPU per",
        "frame offered; consumers: per",
        "frame received, side by side on",
        "the same channels, same window.",
        *(floor_notes if with_floor else ()),
        "Goals (broker): 25 µs/frame at",
        "every rate; 2% of a core at the",
        "real rate (~800 frames/s).",
        "CPU time from " + ("schedstat (ns)." if clock == "schedstat" else "/proc/PID/stat."),
    )
    for j, line in enumerate(notes):
        svg.text(880, 96 + len(series) * 20 + 10 + j * 14, line, size=10, fill="#666666")
    return svg.svg()


CHARTS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "bench-cpu-per-frame.svg": cpu_per_frame,
    "bench-latency-cdf.svg": latency_cdf,
    "bench-whole-market.svg": whole_market,
}


def write_charts(record: dict[str, Any], directory: Path) -> list[Path]:
    """Write every chart the record has the figures for; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chart in CHARTS.items():
        text = chart(record)
        if text is not None:
            path = directory / name
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written
