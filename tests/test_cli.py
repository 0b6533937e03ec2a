"""The command line: every subcommand that exists is listed and has --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bumblefast.cli import build_parser


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bumblefast", *args], capture_output=True, text=True, timeout=120)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_help_lists_every_subcommand():
    out = run("--help")
    assert out.returncode == 0
    for name in subcommands():
        assert name in out.stdout


@pytest.mark.parametrize("name", subcommands())
def test_each_subcommand_has_help(name):
    out = run(name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout.lower()


def test_unknown_argument_is_an_error():
    out = run("model", "info", "configs/models/bumblebee-tiny", "--bogus")
    assert out.returncode == 2 and "unrecognized arguments: --bogus" in out.stderr


def test_missing_model_folder_is_a_clean_error(tmp_path):
    out = run("model", "info", str(tmp_path))
    assert out.returncode == 1 and "no config.json" in out.stderr and "Traceback" not in out.stderr
