"""Loading recipes and overrides: good input resolves, bad input names the key, the value and the source."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest

from configs import CONFIG_DIR, ConfigError, RunConfig, dump_config, load_config
from configs.loader import config_from_dict


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_no_file_gives_the_schema_defaults() -> None:
    assert load_config() == RunConfig()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads_by_name(recipe: str) -> None:
    assert isinstance(load_config(recipe), RunConfig)


def test_overrides_apply_after_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr: 0.2\ndata:\n  batch_size: 64\n")
    cfg = load_config(path, ["optim.lr=0.4", "schedule.step_milestones=[10, 20]", "schedule.decay=step"])
    assert cfg.optim.lr == 0.4
    assert cfg.data.batch_size == 64
    assert cfg.schedule.step_milestones == (10, 20)


def test_yaml_exponent_without_dot_reads_as_float(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "optim:\n  weight_decay: 5e-5\n"), ["optim.lr=1e-2"])
    assert cfg.optim.weight_decay == 5e-5 and cfg.optim.lr == 0.01


def test_int_is_accepted_where_a_float_is_expected() -> None:
    cfg = load_config(None, ["optim.lr=1"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "'optim.lrr'" in message and "did you mean 'optim.lr'" in message


def test_unknown_section_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optimizer.lr'"):
        load_config(None, ["optimizer.lr=0.1"])


def test_wrong_type_names_key_value_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}: data.batch_size='lots' must be int, not str" == str(error.value)


def test_bool_is_not_taken_for_an_int_nor_an_int_for_a_bool() -> None:
    with pytest.raises(ConfigError, match=r"data.batch_size=True must be int"):
        load_config(None, ["data.batch_size=true"])
    with pytest.raises(ConfigError, match=r"data.random_flip=1 must be bool"):
        load_config(None, ["data.random_flip=1"])


def test_impossible_value_names_key_value_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "data:\n  batch_size: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: data.batch_size=0 must be >= 1"


def test_choice_outside_a_literal_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"model.name='resnet19' is not one of 'resnet18', .*'resnet152'"):
        load_config(None, ["model.name=resnet19"])


def test_cross_field_check_reports_the_value_that_broke_it(tmp_path: Path) -> None:
    path = write(tmp_path, "schedule:\n  epochs: 10\n")
    with pytest.raises(ConfigError, match=r"command line: schedule.warmup_epochs=20.0 must be in \[0, epochs=10\]"):
        load_config(path, ["schedule.warmup_epochs=20"])


def test_step_milestones_are_checked_only_for_step_decay() -> None:
    assert load_config(None, ["schedule.epochs=10"]).schedule.decay == "cosine"
    with pytest.raises(ConfigError, match=r"default: schedule.step_milestones=\[30, 60, 80\]"):
        load_config(None, ["schedule.epochs=10", "schedule.decay=step"])


def test_a_value_cannot_be_used_as_a_section(tmp_path: Path) -> None:
    path = write(tmp_path, "optim:\n  lr:\n    peak: 0.1\n")
    expected = rf"{path}: unknown key 'optim.lr.peak' \(optim.lr is a value, not a section\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_a_section_cannot_be_set_as_a_value() -> None:
    with pytest.raises(ConfigError, match=r"'optim' is a section"):
        load_config(None, ["optim=3"])


def test_an_empty_section_in_yaml_means_its_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "checkpoint:\n# nothing here yet\n")) == RunConfig()


def test_malformed_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"override 'optim.lr' must look like section.key=value"):
        load_config(None, ["optim.lr"])


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- optim\n- data\n")
    with pytest.raises(ConfigError, match=rf"{path}: the top level must be a mapping"):
        load_config(path)


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "optim: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_config(path)


def test_missing_file_names_it_and_the_shipped_recipes() -> None:
    with pytest.raises(FileNotFoundError, match=r"'no_such_recipe' not found \(shipped recipes: .*quickstart"):
        load_config("no_such_recipe")


def test_config_is_frozen() -> None:
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config("quickstart", ["optim.nesterov=true", "schedule.decay=step", "schedule.epochs=90",
                                     "tracking.uri=http://127.0.0.1:5000"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_a_key_given_twice_in_a_file_is_refused_with_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.4\n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML: .*duplicate key 'lr' \(line 4\)"):
        load_config(path)
    path.write_text("optim:\n  lr: 0.1\nschedule:\n  epochs: 3\noptim:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match="duplicate key 'optim'"):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from launch.cli import main

    path = tmp_path / "latin1.yaml"
    path.write_bytes("launch:\n  name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{path}: not UTF-8 text"):
        load_config(path)
    assert main(["train", "--config", str(path)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_num_workers_takes_a_number_or_an_elastic_range_that_keeps_the_global_batch(tmp_path: Path) -> None:
    fixed = load_config("quickstart", ["launch.num_workers=3"])
    assert fixed.launch.num_workers == 3 and not fixed.launch.elastic
    assert fixed.accumulation_steps_for(1) == fixed.accumulation_steps_for(3) == 1  # fixed: as configured
    elastic = load_config("quickstart", ["launch.num_workers=[1, 4]", "optim.accumulation_steps=3"])
    assert elastic.launch.num_workers == (1, 4) and elastic.launch.elastic
    assert (elastic.launch.min_workers, elastic.launch.max_workers) == (1, 4)
    # 4 workers x 3 micro-batches = 12 micro-batches per step at every size.
    assert [elastic.accumulation_steps_for(size) for size in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert load_config(tmp_path / "saved.yaml" if (tmp_path / "saved.yaml").write_text(
        dump_config(elastic)) else None) == elastic  # a range survives the run folder's config.yaml

    with pytest.raises(ConfigError, match=r"launch.num_workers=\[2, 4\] includes world sizes that do not divide "
                                          r"the 4 micro-batches .* sizes that do: \[1, 2, 4\]"):
        load_config("quickstart", ["launch.num_workers=[2, 4]"])
    with pytest.raises(ConfigError, match=r"needs launch.launcher='ray'"):
        load_config("quickstart", ["launch.num_workers=[1, 2]", "launch.launcher=torchrun"])
    with pytest.raises(ConfigError, match=r"needs distributed.strategy='ddp' \(a DeepSpeed ZeRO checkpoint"):
        load_config("quickstart", ["launch.num_workers=[1, 2]", "distributed.strategy=deepspeed"])
    with pytest.raises(ConfigError, match=r"launch.num_workers=\[3, 2\] must be >= 1, or a range"):
        load_config("quickstart", ["launch.num_workers=[3, 2]"])
    with pytest.raises(ConfigError, match=r"launch.num_workers=\[1, 2, 3\] must be a list of 2 values"):
        load_config("quickstart", ["launch.num_workers=[1, 2, 3]"])


def test_the_digits_set_is_rendered_locally_so_a_url_root_needs_a_folder_data_set() -> None:
    with pytest.raises(ConfigError, match=r"data.root='http://host/digits' is a URL, but data.dataset='digits'"):
        load_config("quickstart", ["data.root=http://host/digits"])
    assert load_config("quickstart", ["data.root=http://host/digits", "data.dataset=folder"]).data.dataset == "folder"


def test_data_num_workers_still_reads_with_a_warning_that_names_its_replacements(tmp_path: Path) -> None:
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  num_workers: 0\n")
    with pytest.warns(FutureWarning, match=rf"{recipe}: data.num_workers is deprecated: .*set data.dali_threads and "
                                           "data.loader_workers instead"):
        old = load_config(recipe)
    assert (old.data.dali_threads, old.data.loader_workers) == (1, 0)  # what each loader ran with before
    newer = tmp_path / "newer.yaml"
    newer.write_text("data:\n  loader_workers: 2\n")
    with pytest.warns(FutureWarning, match="command line: data.num_workers"):
        given = load_config(newer, ["data.num_workers=6"])
    assert (given.data.dali_threads, given.data.loader_workers) == (6, 2)  # an explicit new key wins
    # A config written before the rename (a checkpoint's manifest) still loads.
    with pytest.warns(FutureWarning):
        assert config_from_dict({"data": {"num_workers": 4}}, "manifest.json").data.loader_workers == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("quickstart", ["data.dali_threads=3"])  # the new keys: no warning
