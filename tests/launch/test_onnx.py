"""ONNX export: the graph onnxruntime runs gives PyTorch's logits on real images, and a graph that does not is
refused and not kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import load_config
from launch.tracking import artifacts
from launch.tracking.artifacts import Trained, evaluation_images, export_trained
from launch.tracking.onnx_export import (INPUT_NAME, ONNX_ATOL, ONNX_RTOL, ParityError, check_parity, export_onnx,
                                         onnx_session)
from trainer.models import build_model


@pytest.fixture(scope="module")
def trained(digits_root: Path) -> Trained:
    # Untrained weights, but the network, preprocessing and images of a digits run: parity does not depend on
    # what the weights learnt. A few BatchNorm statistics are moved off their initial values so the graph's
    # folded normalisation is exercised.
    cfg = load_config("quickstart", [f"data.root={digits_root}", "data.loader=torch", "data.loader_workers=0"])
    torch.manual_seed(0)
    network = build_model(cfg.model)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return Trained(network.eval(), cfg, "test network", {"classes": [str(d) for d in range(10)]})


def test_the_onnx_export_gives_pytorchs_logits_on_real_images(trained: Trained, tmp_path: Path) -> None:
    images = evaluation_images(trained, 64)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    written = export_trained(trained, tmp_path, format="onnx", parity_images=images)
    parity = written["parity"]
    assert parity.ok and parity.images == 64 and parity.top1_agree == 64
    assert parity.max_abs_diff < ONNX_ATOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.onnx", "model.pt"]
    metadata = json.loads((tmp_path / "model.json").read_text())
    assert metadata["program"] == {"file": "model.onnx", "format": "onnx", "opset": 18, "input_name": "images",
                                   "output_name": "logits"}
    # Any batch size: the batch dimension is dynamic. And the logits are the network's, image by image.
    session = onnx_session(tmp_path / "model.onnx")
    odd = images[:5]
    logits = session.run(None, {INPUT_NAME: odd.numpy()})[0]
    with torch.no_grad():
        expected = trained.network(odd).numpy()
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, expected, rtol=ONNX_RTOL, atol=ONNX_ATOL)


def test_a_graph_that_computes_something_else_is_refused_and_not_kept(trained: Trained, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    images = evaluation_images(trained, 16)
    # The check sees a change of 1e-3 in one class's bias, well inside what would flip no top-1 at all.
    shifted = copy.deepcopy(trained.network)
    with torch.no_grad():
        shifted.fc.bias[3] += 1e-3
    export_onnx(shifted, 16, tmp_path / "shifted.onnx")
    parity = check_parity(tmp_path / "shifted.onnx", trained.network, images)
    assert not parity.ok and parity.worst_excess > 0
    assert parity.max_abs_diff == pytest.approx(1e-3, rel=0.05)

    # Through export: a graph that disagrees is removed, with the measured difference in the error.
    monkeypatch.setattr(artifacts, "export_onnx", lambda network, size, path: export_onnx(shifted, size, path))
    with pytest.raises(ParityError, match=r"model.onnx: onnxruntime vs PyTorch on 16 val images: max \|logit "
                                          r"difference\| 1.0\de-03 .*not kept"):
        export_trained(trained, tmp_path / "out", format="onnx", parity_images=images)
    assert not (tmp_path / "out" / "model.onnx").exists()
