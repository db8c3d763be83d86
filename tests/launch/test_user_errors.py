"""Only the user's errors become user errors (exit 2, one line): an undecodable image, an unreachable
tracking server, an unknown model. A bug in evaluation or prediction keeps its type and traceback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs import ConfigError, load_config
from launch.tracking import registry
from launch.tracking.artifacts import Trained, predict_files
from launch.tracking.served_model import ImageClassifierModel
from launch.tracking.store import limit_http_calls
from tests.multiproc import free_port
from trainer.models import build_model

CPU = torch.device("cpu")


class EvaluationBug(Exception):
    """Stands in for a defect in the project's own code."""


def fail(*args: object, **kwargs: object) -> None:
    raise EvaluationBug("a defect, not the user's input")


@pytest.fixture(scope="module")
def untrained() -> Trained:
    cfg = load_config("quickstart", ["data.image_size=16"])
    classes = [str(digit) for digit in range(cfg.model.num_classes)]
    return Trained(build_model(cfg.model).eval(), cfg, "untrained", {"classes": classes, "step": 0})


def test_predict_names_an_undecodable_file_and_lets_a_bug_through(untrained: Trained, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = tmp_path / "seven.png", tmp_path / "broken.jpg"
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 10, 10)).save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    bad.write_bytes(b"\xff\xd8\xff not a JPEG")
    assert len(predict_files(untrained, [good], top_k=3)) == 1
    with pytest.raises(ConfigError, match=rf"{bad}: .*not a decodable JPEG/PNG image") as refused:
        predict_files(untrained, [good, bad], top_k=3)
    assert refused.value.__cause__ is not None  # the served model's own error is kept as the cause
    monkeypatch.setattr(ImageClassifierModel, "predict", fail)
    with pytest.raises(EvaluationBug):  # not "the image file is bad"
        predict_files(untrained, [good], top_k=3)


def test_the_gate_blames_the_tracking_uri_only_for_tracking_errors(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    client.create_registered_model("digits")
    client.create_model_version("digits", source=str(tmp_path), tags={"val_top1": "0.9"})
    # An unknown version and an unreachable server are the user's to fix: one line, exit status 2.
    with pytest.raises(ConfigError, match="has no version '7'"):
        registry.promote(store, "digits", "7", "production")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    limit_http_calls(timeout_s=2, max_retries=0)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=rf"tracking URI {dead}: "):
        registry.promote(dead, "digits", "1", "production")
    # A defect in the gate's own evaluation propagates as what it is.
    monkeypatch.setattr(registry, "evaluate_version", fail)
    with pytest.raises(EvaluationBug):
        registry.promote(store, "digits", "1", "production", eval_data=str(tmp_path), device=CPU)
    assert registry.promote(store, "digits", "1", "production").accepted  # the negative control: it works
