"""Every command is reachable and explains itself; usage errors exit 2."""

from click.testing import CliRunner

from cli.dataprep import COMMANDS as DATAPREP_COMMANDS
from cli.dataprep import main as dataprep_main
from cli.trainer import COMMANDS as TRAINER_COMMANDS
from cli.trainer import main as trainer_main


def test_dataprep_help_lists_every_command():
    result = CliRunner().invoke(dataprep_main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in DATAPREP_COMMANDS:
        assert name in result.output
    assert "convert" in result.output


def test_each_command_has_help():
    runner = CliRunner()
    for group, commands in ((dataprep_main, DATAPREP_COMMANDS), (trainer_main, TRAINER_COMMANDS)):
        for name in commands:
            result = runner.invoke(group, [name, "--help"])
            assert result.exit_code == 0, (name, result.output)
            assert "Usage:" in result.output


def test_unknown_command_is_usage_error():
    result = CliRunner().invoke(dataprep_main, ["no-such-command"])
    assert result.exit_code == 2
