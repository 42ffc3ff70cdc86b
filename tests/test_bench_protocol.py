"""The bench protocol: stdout carries one JSON line, last; logs go to stderr; a --quick run
never replaces a committed result."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from bench import common


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "QUICK_RESULTS", tmp_path / "quick")
    (tmp_path / "demo.json").write_text('{"committed": true}\n')
    return tmp_path


def run_report() -> None:
    common.report("demo", ours={"ops": 2}, baseline={"ops": 1}, ratio=2.0, target=1.0, ok=True,
                  rows=[("ops", "2", "1")])  # fmt: skip
    structlog.get_logger().info("bench.server_stopped")  # as a server stopped after the run


def test_a_quick_run_leaves_the_committed_result_alone(
    results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "QUICK", True)
    run_report()
    assert json.loads((results / "demo.json").read_text()) == {"committed": True}
    quick = json.loads((results / "quick" / "demo.json").read_text())
    assert quick["quick"] is True
    assert quick["ratio"] == 2.0


def test_stdout_is_the_json_line_alone_even_with_logs_after_it(
    results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "QUICK", False)
    run_report()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, f"stdout must hold the JSON line only, got {lines!r}"
    assert json.loads(lines[-1])["bench"] == "demo"
    assert json.loads((results / "demo.json").read_text())["ratio"] == 2.0


def test_importing_the_bench_plumbing_sends_logs_to_stderr() -> None:
    """In a fresh process (this one's logging is the suite's): structlog's default prints to
    stdout, where a log line after the JSON would break every reader of the protocol."""
    code = "import bench.common, structlog; structlog.get_logger().info('after.the.json')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.stdout == ""
    assert "after.the.json" in done.stderr


BENCH = Path(__file__).resolve().parents[1] / "bench"


def _benches() -> list[str]:
    return sorted(
        p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_") and p.stem != "common"
    )


def _stdout_offences(source: str) -> list[str]:
    """What a bench module does against the protocol: print() (stdout), or a main() that
    neither ends with ``report(...)`` nor writes its own JSON line (chaos) after everything."""
    tree = ast.parse(source)
    found = [
        f"line {node.lineno}: print()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    ]
    if "from bench.common import" not in source and "from bench import common" not in source:
        found.append("does not import bench.common (its logging goes to stderr)")
    if "report(" not in source and "sys.stdout.write(json.dumps(" not in source:
        found.append("never writes the JSON line")
    return found


@pytest.mark.parametrize("name", _benches())
def test_every_bench_keeps_stdout_for_its_json_line(name: str) -> None:
    """Issue 12: ``surge bench ratelimit`` once printed log lines after its JSON line."""
    assert not _stdout_offences((BENCH / f"{name}.py").read_text())


def test_the_bench_checker_catches_a_print() -> None:
    bad = "from bench.common import report\ndef main():\n    report('x')\n    print('done')\n"
    assert _stdout_offences(bad) == ["line 4: print()"]
    assert _stdout_offences("def main():\n    pass\n") == [
        "does not import bench.common (its logging goes to stderr)",
        "never writes the JSON line",
    ]
