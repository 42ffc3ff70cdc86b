"""The shipped Prometheus rules: generated from the settings (one source of thresholds) and
checked with Prometheus' own ``promtool test rules`` (Debian's ``prometheus`` package; .ci/run
installs it). Without promtool the promtool tests are skipped and say why."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from surge.cli import alert_rules_text
from surge.config import Settings
from surge.kit.telemetry.alerts import default_rules
from surge.kit.telemetry.prometheus_rules import (
    AlertThresholds,
    prometheus_rules,
    render_rules,
    rules_from_settings,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="no promtool (apt-get install prometheus)"
)


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


class TestOneSource:
    def test_committed_file_is_generated_from_the_default_settings(self) -> None:
        committed = (DEPLOY / "alerts.yml").read_text()
        assert committed == alert_rules_text(Settings.model_construct()), (
            "deploy/prometheus/alerts.yml is stale: run `surge alert-rules --write`"
        )

    def test_a_threshold_setting_changes_the_generated_rule(self) -> None:
        settings = Settings.model_construct(ALERT_ERROR_RATIO=0.05)
        assert "/ sum(rate(http_requests_total[5m])) > 0.05" in rules_from_settings(settings)

    def test_the_shed_thresholds_come_from_their_settings(self) -> None:
        settings = Settings.model_construct(ALERT_SHED_RATIO=0.02, ALERT_SHED_RATIO_CRITICAL=0.3)
        shed = [r for r in prometheus_rules(AlertThresholds.from_settings(settings))
                if r.alert == "HighShedRatio"]  # fmt: skip
        assert [(r.severity, r.expr.splitlines()[1][-6:]) for r in shed] == [
            ("warning", "> 0.02"),
            ("critical", " > 0.3"),
        ]
        assert all(r.runbook and "SURGE_HTTP_MAX_IN_FLIGHT" in r.runbook for r in shed)

    def test_in_process_rules_and_prometheus_rules_are_the_same_alerts(self) -> None:
        thresholds = AlertThresholds.from_settings(Settings.model_construct())
        in_process = {rule.name: rule.threshold for rule in default_rules(thresholds=thresholds)}
        exported = {rule.alert for rule in prometheus_rules(thresholds)}
        assert set(in_process) <= exported
        # The seed 002/003 thresholds the issue names.
        assert in_process["HighErrorRatio"] == 0.01
        assert in_process["HighResponseTime"] == 0.2
        assert in_process["LowCacheHitRatio"] == pytest.approx(0.1)  # miss ratio: hits < 90 %
        assert in_process["HighMemoryUsage"] == 0.9
        assert in_process["SlowDatabaseQuery"] == 0.5


@needs_promtool
class TestPromtool:
    def test_rules_are_valid(self) -> None:
        result = _promtool("check", "rules", "alerts.yml", cwd=DEPLOY)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_fires_and_stays_silent_on_its_fixtures(self) -> None:
        result = _promtool("test", "rules", "alerts.test.yml", cwd=DEPLOY)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_the_fixtures_catch_a_wrong_threshold(self, tmp_path: Path) -> None:
        """The same fixtures against rules with a 10 % error-ratio threshold: the sick fleet's
        4.8 % no longer fires, and promtool must say so."""
        wrong = replace(AlertThresholds.from_settings(Settings.model_construct()), error_ratio=0.1)
        (tmp_path / "alerts.yml").write_text(render_rules(prometheus_rules(wrong)))
        shutil.copy(DEPLOY / "alerts.test.yml", tmp_path / "alerts.test.yml")
        result = _promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
        assert result.returncode != 0
        assert "HighErrorRatio" in result.stdout + result.stderr
