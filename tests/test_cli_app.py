"""The root command: shell completion, and the exit codes `squeeze --help` lists against those the code uses."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from squeeze.cli.app import EXIT_CODES
from squeeze.cli.common import handles_errors
from squeeze.errors import SqueezeError
from squeeze.quant.parity import ParityError
from squeeze.quant.run import NotFasterError as QuantNotFaster
from squeeze.reparam.run import NotFasterError as ReparamNotFaster

SOURCE = Path(__file__).parent.parent / "squeeze"


def test_help_lists_every_exit_code(cli):
    r = cli("--help")
    text = " ".join(r.stdout.split())  # rich wraps the epilog to the terminal's width
    assert r.exit_code == 0 and "Exit codes:" in text
    for code, meaning in EXIT_CODES.items():
        assert f"{code}: {' '.join(meaning.split())}" in text


def test_the_listed_codes_are_the_ones_the_code_sets():
    used = set()
    for path in SOURCE.rglob("*.py"):  # an error's exit_code, typer.Exit(N) and the Ctrl-C handler's os._exit(N)
        for groups in re.findall(r"exit_code = (\d+)|Exit\((\d+)\)|_exit\((\d+)\)", path.read_text()):
            used.add(int("".join(groups)))
    assert used | {0} == set(EXIT_CODES)


@pytest.mark.parametrize("raised,code", [
    (SqueezeError("bad input.", "Fix it."), 2),
    (QuantNotFaster("not faster."), 1),
    (ReparamNotFaster("not faster."), 1),
    (ParityError("below the floor."), 1),
    (RuntimeError("a bug"), 3),
    (KeyboardInterrupt(), 130),
])
def test_each_kind_of_failure_exits_with_its_listed_code(raised, code):
    @handles_errors
    def command():
        raise raised

    with pytest.raises(typer.Exit) as exited:
        command()
    assert exited.value.exit_code == code and code in EXIT_CODES


def test_bad_input_exits_2_without_a_traceback(cli):
    r = cli("validate", "no-such-recipe")
    assert r.exit_code == 2 and "No recipe file `no-such-recipe`" in r.output and "Traceback" not in r.output


def test_show_completion_prints_the_shell_script(cli):
    r = cli("--show-completion", "bash")
    assert r.exit_code == 0 and "_SQUEEZE_COMPLETE=complete_bash" in r.stdout
    assert "complete -o default -F _squeeze_completion squeeze" in r.stdout


def test_the_installed_command_completes_subcommands():
    env = {**os.environ, "_SQUEEZE_COMPLETE": "complete_bash", "COMP_WORDS": "squeeze li", "COMP_CWORD": "1"}
    squeeze = Path(sys.executable).parent / "squeeze"
    r = subprocess.run([str(squeeze)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["list"]
