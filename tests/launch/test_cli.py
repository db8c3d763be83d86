"""`python -m launch`: printing the resolved config, clean errors, the digits command."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import load_config
from launch.cli import main


def test_print_config_shows_the_resolved_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--print-config", "optim.lr=0.4", "data.batch_size=128"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    assert load_config(path) == load_config("quickstart", ["optim.lr=0.4", "data.batch_size=128"])
    assert "lr: 0.4" in printed and "batch_size: 128" in printed


def test_bad_override_exits_2_and_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "optim.lrr=0.4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)")


def test_bad_value_in_a_config_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("schedule:\n  epochs: -1\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"error: {path}: schedule.epochs=-1 must be >= 1" in capsys.readouterr().err


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--config", "does/not/exist.yaml"]) == 2
    assert "config file 'does/not/exist.yaml' not found" in capsys.readouterr().err


def test_bad_input_writes_no_run_folder(tmp_path: Path) -> None:
    assert main(["train", f"launch.runs_dir={tmp_path}", "data.batch_size=-3"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_data_digits_command_renders_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "digits", "--out", str(tmp_path / "digits")]) == 0
    assert "digits: 10 classes, 1442 train and 355 val images" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "digits" / "train").iterdir()) == [str(d) for d in range(10)]


def test_diverging_training_exits_3_with_the_reason(tmp_path: Path, digits_root: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--launcher", "torchrun", f"launch.runs_dir={tmp_path}", f"data.root={digits_root}",
                 "data.image_size=8", "data.batch_size=64",
                 "data.dali_threads=1", "data.loader_workers=0", "optim.lr=1e30",
                 "schedule.warmup_epochs=0",
                 "optim.max_nonfinite_steps=3"])
    assert code == 3
    assert "training stopped: " in capsys.readouterr().err


def test_every_command_is_registered_with_its_handler(capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import COMMANDS, build_parser

    words = {" ".join(registered.words) for registered in COMMANDS}
    assert words == {"train", "bench step", "bench data", "bench train", "bench launch", "bench gpu",
                     "bench accuracy", "bench infer", "bench elastic", "eval", "export", "predict", "promote", "serve",
                     "data prepare", "data pack", "data digits"}
    parser = build_parser()
    for registered in COMMANDS:
        required = [flags[0] for flags, options in registered.arguments
                    if not flags[0].startswith("-") and options.get("nargs") != "*"]
        extra = ["--out", "x"] if registered.words in (("export",), ("data", "digits"), ("data", "pack"),
                                                              ("bench", "gpu")) else []
        extra += ["--version", "1", "--alias", "a"] if registered.words == ("promote",) else []
        args = parser.parse_args([*registered.words, *(["x"] * len(required)), *extra])
        assert args.handler is registered.handler
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "exit status: 0 done; 2 bad input" in capsys.readouterr().out


def test_each_error_kind_has_its_exit_status() -> None:
    from configs.errors import ConfigError, IncompatibleSettings, MissingExtraError
    from data_pipeline import DatasetError
    from launch.errors import PromotionRefused, RunFailed, TrackingIncomplete, exit_status_of
    from trainer import TrainingDiverged
    from trainer.checkpoint import CheckpointUnreadable
    from trainer.preempt import Preempted

    kinds = (ConfigError, IncompatibleSettings, MissingExtraError, DatasetError, FileNotFoundError, TrainingDiverged,
             RunFailed, PromotionRefused, TrackingIncomplete, CheckpointUnreadable, Preempted)
    statuses = [row.status for kind in kinds if (row := exit_status_of(kind())) is not None]
    assert statuses == [2, 2, 2, 2, 2, 3, 4, 5, 6, 74, 75]
    # A bug, not a user's error: no status, it propagates with its traceback; so does a plain OSError.
    assert exit_status_of(KeyError()) is None and exit_status_of(ConnectionResetError()) is None
