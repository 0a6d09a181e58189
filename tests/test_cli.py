"""CLI surface: every command's help has an example; --json output parses; the demo runs end to end."""

from __future__ import annotations

import json

import pytest

from skillgraft.cli.main import app, main


def _commands():
    import typer.main

    from skillgraft.cli.main import _register

    _register()
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        if sub:
            yield from ([name, s] for s in sub)
        else:
            yield [name]


@pytest.mark.parametrize("argv", list(_commands()), ids=" ".join)
def test_every_command_has_an_example(argv, capsys):
    assert main([*argv, "--help"]) == 0
    assert "Example:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["merge", "x.yaml", "-o", "out", "--no-such"], ["merge"], ["no-such-command"]])
def test_usage_errors_are_one_message_and_exit_2(argv, capsys):
    assert main(argv) == 2  # a click usage error, not a traceback
    err = capsys.readouterr().err
    assert "Error:" in err and "Traceback" not in err


def test_expected_commands_exist():
    names = {" ".join(c) for c in _commands()}
    for cmd in [
        "extract",
        "apply",
        "inspect",
        "import-lora",
        "export-lora",
        "demo",
        "library add",
        "library list",
        "library show",
        "library rm",
        "library verify",
        "library search",
    ]:
        assert cmd in names


def test_extract_json_and_library_round_trip(llama_pair, tmp_path, capsys):
    base, tuned = llama_pair
    out = tmp_path / "math.skill"
    assert main(["-q", "extract", str(base), str(tuned), "-o", str(out), "--budget", "20%", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["file_bytes"] == out.stat().st_size <= report["budget_bytes"]
    assert {"attention", "mlp"} <= set(report["by_kind"])
    lib = str(tmp_path / "lib")
    assert main(["library", "add", str(out), "--library", lib, "--json"]) == 0
    capsys.readouterr()
    assert main(["library", "list", "--base", str(base), "--library", lib, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["math"]
    assert main(["-q", "apply", str(base), "math@1:0.5", "-o", str(tmp_path / "m"), "--library", lib, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skills"] == [{"name": "math", "version": 1, "weight": 0.5}]
    assert main(["inspect", "math", "--library", lib, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "math"
