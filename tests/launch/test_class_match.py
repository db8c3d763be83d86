"""Evaluation sets are matched to the model's classes by name: a subset is remapped, unknown names are refused
naming them, numbered folders need a class map, and `eval` scores several sets in one call."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer
from configs import IncompatibleSettings, load_config
from data_pipeline.prepare import prepare_index
from launch.tracking.artifacts import Trained, evaluate_trained, load_trained
from launch.tracking.class_match import ClassMatch, match_classes
from trainer.dist import single_process_context

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def checkpoints(digits_root: Path, module_tmp: Path) -> Path:
    folder = module_tmp / "checkpoints"
    cfg = load_config("quickstart", [f"data.root={digits_root}", "data.dataset=folder", "data.image_size=8",
                                     "data.loader_workers=0", "distributed.strategy=none", "schedule.epochs=1",
                                     "schedule.warmup_epochs=0", f"checkpoint.url={folder}"])
    trainer.run(cfg, single_process_context(), [])
    return folder


def copy_of(digits_root: Path, dest: Path, names: dict[str, str]) -> Path:
    """The digits set with only the classes `names` lists, each under its new folder name, indexed."""
    for split in ("train", "val"):
        for old, new in names.items():
            shutil.copytree(digits_root / split / old, dest / split / new)
    prepare_index(dest, num_workers=1)
    return dest


def score(trained: Trained, root: Path, **kwargs: object) -> tuple[dict[str, float], ClassMatch]:
    scored = evaluate_trained(trained, device=CPU, data_root=str(root), **kwargs)  # type: ignore[arg-type]
    return scored.scores, scored.classes


def correct(scores: dict[str, float]) -> int:
    return round(scores["val_top1"] * scores["val_images"])


def test_subsets_are_scored_by_name_and_their_hits_add_up_to_the_whole_sets(
        checkpoints: Path, digits_root: Path, tmp_path: Path) -> None:
    trained = load_trained(str(checkpoints))
    whole, match = score(trained, digits_root)
    assert match.identity and match.how == "the model's classes, in its order" and whole["val_top1"] > 0.5
    low = copy_of(digits_root, tmp_path / "low", {str(c): str(c) for c in range(5)})
    high = copy_of(digits_root, tmp_path / "high", {str(c): str(c) for c in range(5, 10)})
    low_scores, low_match = score(trained, low)
    high_scores, high_match = score(trained, high)
    assert high_match.remap == (5, 6, 7, 8, 9) and high_match.how.startswith("by name (5 of the model's 10")
    assert low_scores["val_images"] + high_scores["val_images"] == whole["val_images"]
    assert correct(low_scores) + correct(high_scores) == correct(whole)
    # Negative control: scored by position (its labels 0..4 taken as the model's outputs 0..4), as before.
    from dataclasses import replace

    from data_pipeline import build_loaders
    from trainer.evaluate import evaluate
    from trainer.precision import resolve_precision

    loaders = build_loaders(replace(trained.cfg.data, root=str(high), index_dir=None), seed=0)
    naive = evaluate(trained.network, loaders.val, resolve_precision(trained.cfg.precision, CPU), channels_last=False)
    assert correct(naive) < correct(high_scores) / 2, (naive, high_scores)


def test_unknown_names_are_refused_and_a_class_map_scores_them_exactly_as_the_original(
        checkpoints: Path, digits_root: Path, tmp_path: Path) -> None:
    trained = load_trained(str(checkpoints))
    words = copy_of(digits_root, tmp_path / "words", {str(c): word for c, word in enumerate(WORDS)})
    with pytest.raises(IncompatibleSettings, match=r"10 classes the model does not know: 'eight', 'five', 'four'"):
        score(trained, words)
    whole, identity = score(trained, digits_root)
    mapped, match = score(trained, words, class_map={word: str(c) for c, word in enumerate(WORDS)})
    # The same images with the same labels: the same score, through another mapping (folders sort by word).
    assert {k: v for k, v in mapped.items() if k != "val_loss"} == {k: v for k, v in whole.items() if k != "val_loss"}
    assert mapped["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)  # summed in another order
    assert match.remap == (8, 5, 4, 9, 1, 7, 6, 3, 2, 0)
    assert match.how == "by the class map (10 folders renamed)" and match.digest != identity.digest


def test_numbered_folders_are_told_to_bring_a_class_map() -> None:
    with pytest.raises(IncompatibleSettings, match="numbered folders needs --class-map FILE"):
        match_classes(["0", "1", "2"], ["n01440764", "n01443537", "n01484850"], outputs=3, data="imagenetv2")
    with pytest.raises(IncompatibleSettings, match="gives two folders the class 'a'"):
        match_classes(["x", "y"], ["a", "b"], outputs=2, data="d", class_map={"x": "a", "y": "a"})
    with pytest.raises(IncompatibleSettings, match="has 3 classes, the model 2"):
        match_classes(["a", "b", "c"], None, outputs=2, data="d")


def test_eval_scores_several_sets_in_one_call_with_the_gap_and_the_mapping(
        checkpoints: Path, digits_root: Path, tmp_path: Path) -> None:
    words = copy_of(digits_root, tmp_path / "words", {str(c): word for c, word in enumerate(WORDS)})
    class_map = tmp_path / "words.txt"
    class_map.write_text("".join(f"{word} {c}\n" for c, word in enumerate(WORDS)))
    command = [sys.executable, "-m", "launch", "eval", str(checkpoints), "--data", str(digits_root), "--data",
               str(words), "--class-map", str(class_map)]
    result = subprocess.run([*command, "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = map(json.loads, result.stdout.splitlines()[-2:])
    assert (first["data"], second["data"]) == (str(digits_root), str(words))
    assert first["val_top1"] == second["val_top1"] and first["class_map_digest"] != second["class_map_digest"]
    text = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300).stdout
    assert "(+0.00 points from the first)" in text and "classes by the class map (10 folders renamed)" in text
