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


def test_export_vlm_help_lists_distillation_options_apart():
    from linecam.export.cli import cli as export_cli

    res = CliRunner().invoke(export_cli, ["vlm", "--help"])
    assert res.exit_code == 0, res.output
    head, sep, tail = res.output.partition("Distillation options (with --distil-from")
    assert sep, res.output
    head = head.split("\nOptions:\n", 1)[1]
    assert "--model PATH" in head and "--quantize" in head and "--distil-from" not in head
    for opt in ("--distil-from", "--images", "--lora-r", "--steps", "--min-agreement"):
        assert opt in tail
    assert "Distil:" not in res.output
