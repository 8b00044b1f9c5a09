"""Help screens a new user meets (issue 21): `linecam -h` works as `export-engine -h` does;
no literal printf escapes in help text."""

from __future__ import annotations

from click.testing import CliRunner

from linecam.cli import cli


def test_linecam_dash_h():
    res = CliRunner().invoke(cli, ["-h"])
    assert res.exit_code == 0, res.output
    assert "Commands:" in res.output and "check" in res.output and "tiles" in res.output


def test_bench_help_has_no_doubled_percent():
    res = CliRunner().invoke(cli, ["bench", "--help"])
    assert res.exit_code == 0, res.output
    assert "%%" not in res.output and "80 %" in res.output
