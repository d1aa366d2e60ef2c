"""The demo's report records a command line that runs the same demo again."""
import shlex

import pytest

from nnunet_ext.cli import demo as demo_cli
from nnunet_ext.cli.main import build_parser
from nnunet_ext.workflows.demo import DemoConfig, demo_command


def _parsed(command: str) -> DemoConfig:
    argv = shlex.split(command)
    assert argv[:2] == ["nnunet-ext", "demo"]
    return demo_cli.config(build_parser().parse_args(argv[1:]))


@pytest.mark.parametrize("cfg, flags", [
    (DemoConfig(workdir="demo_s0"), []),
    (DemoConfig(workdir="runs/demo 12", seed=2, train_cases=12), ["--cases 12", "--seed 2"]),
    (DemoConfig(workdir="d", trainers=("ExtBaselineTrainer", "LSRTrainer"), shape=(64, 64, 64), difficulty=1.0,
                epochs=5, test_cases=10, disable_tta=False, dataset_id=777),
     ["-tr ExtBaselineTrainer LSRTrainer", "--shape 64 64 64", "--difficulty 1", "--epochs 5", "--test-cases 10",
      "--tta", "-d 777"]),
])
def test_demo_command_runs_the_same_demo(cfg, flags):
    cmd = demo_command(cfg)
    for f in flags:
        assert f" {f}" in cmd, cmd
    assert cmd.count(" -") + cmd.count(" --") >= len(flags)
    assert _parsed(cmd) == cfg  # parsed by the command line, it is the same configuration
    if not flags:
        assert cmd == "nnunet-ext demo --workdir demo_s0"  # the defaults are not repeated
