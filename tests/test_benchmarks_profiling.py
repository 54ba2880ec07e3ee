"""benchmarks.profiling: the summary of a collapsed-stack profile (pure) and the commands."""

from __future__ import annotations

from pathlib import Path

from benchmarks.profiling import command, summarize

AUSTIN = """# austin: 3.7.0
# mode: cpu

P1;T0:1;/x/cli.py:main:3;/x/publisher.py:Publisher._flush_burst:10;/x/resp.py:send:5 30
P1;T0:1;/x/cli.py:main:3;/x/upstream.py:Upstream._receive:7 60
P1;T0:1;/x/cli.py:main:3 10
"""


def test_summary_counts_own_and_inclusive_samples() -> None:
    text = summarize(AUSTIN)
    assert text.startswith("total weight 100")
    own, inclusive = text.split("inclusive:")
    assert "60.0%  /x/upstream.py:Upstream._receive" in own
    assert "30.0%  /x/resp.py:send" in own
    assert "10.0%  /x/cli.py:main" in own
    assert "100.0%  /x/cli.py:main" in inclusive
    assert "30.0%  /x/publisher.py:Publisher._flush_burst" in inclusive
    assert summarize("# nothing\n") == "no samples\n"


def test_commands_sample_the_pid_for_the_window(tmp_path: Path) -> None:
    out = tmp_path / "p.txt"
    austin = command("austin", "/bin/austin", 42, 6.0, out)
    assert austin[:1] == ["/bin/austin"] and "-s" in austin
    assert austin[austin.index("-p") + 1] == "42" and austin[austin.index("-x") + 1] == "6"
    spy = command("py-spy", "/bin/py-spy", 42, 6.0, out)
    assert spy[1] == "record" and spy[spy.index("-d") + 1] == "6" and str(out) in spy
