"""tracking.register_weights: the final, the best or the EMA weights of a run become the registered version,
with their own scores as its val_* tags, in a real MLflow registry (the embedded sqlite store)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from configs import ConfigError, RunConfig, load_config
from launch.tracking.registry import register_model
from trainer import run as train
from trainer.checkpoint import open_checkpoints
from trainer.dist import single_process_context
from trainer.serialize import from_bytes

# `make test` installs the mlflow extra: without it these tests must fail to import, not skip.
import mlflow  # noqa: E402

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]


def test_the_final_best_or_ema_weights_are_registered_with_their_own_scores(digits_root: Path,
                                                                              tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"

    def config(*extra: str) -> RunConfig:
        return load_config("quickstart", [
            f"data.root={digits_root}", "data.dataset=folder", "data.image_size=8", "data.batch_size=64",
            "data.dali_threads=1", "data.loader_workers=0", "optim.ema_decay=0.9", f"checkpoint.url={checkpoints}",
            "checkpoint.keep_last=1", *extra])

    train(config("schedule.epochs=1"), single_process_context(), [])
    # A second epoch at an absurd learning rate: the final weights become worse than the best kept step.
    train(config("schedule.epochs=2", "optim.lr=50"), single_process_context(), [])
    manager = open_checkpoints(str(checkpoints), keep_last=1)
    final, best = manager.latest(), manager.best()
    assert final is not None and best is not None and best.step < final.step  # the fault: a worse final step
    assert best.meta["val_top1"] > final.meta["val_top1"]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # Artifacts beside the store: without a location MLflow would write them to ./mlruns, in the checkout.
    experiment = client.create_experiment("tests", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    registered = {}
    for weights in ("final", "best", "ema"):
        model_uri = register_model(config(f"tracking.register_weights={weights}"), tracking_uri=uri, run_id=run_id,
                                   checkpoint_url=str(checkpoints))
        registered[weights] = client.get_model_version("resnet18-digits", model_uri.rsplit("/", 1)[1])
    expected = {"final": (final, "model.pt", "val_top1"), "best": (best, "model.pt", "val_top1"),
                "ema": (final, "ema.pt", "ema_val_top1")}
    for weights, (manifest, file, score) in expected.items():
        version = registered[weights]
        assert version.tags["registered_weights"] == weights and version.tags["step"] == str(manifest.step)
        assert float(version.tags["val_top1"]) == manifest.meta[score]
        # The logged model carries the same score as its own metric.
        logged = {m.key: m.value for m in client.get_logged_model(version.source.rsplit("/", 1)[-1]).metrics}
        assert logged["val_top1"] == manifest.meta[score]
        folder = Path(client.download_artifacts(run_id, version.tags["weights"], str(tmp_path / weights)))
        state = torch.load(folder / "model.pt", weights_only=True)
        for name, tensor in from_bytes(manager.read_verified(manifest, file)).items():
            assert torch.equal(state[name], tensor), (weights, name)
    assert len({version.version for version in registered.values()}) == 3
    # The mean of the kept steps (the best and the final one), BatchNorm statistics estimated again.
    from launch.tracking.averaging import averaged_trained

    average = register_model(config("checkpoint.keep_last=2", "tracking.register_weights=average",
                                    "tracking.average_last=2", "tracking.average_bn_batches=5"),
                             tracking_uri=uri, run_id=run_id, checkpoint_url=str(checkpoints))
    version = client.get_model_version("resnet18-digits", average.rsplit("/", 1)[1])
    assert (version.tags["registered_weights"], version.tags["averaged_steps"]) == (
        "average", f"{best.step},{final.step}")
    folder = Path(client.download_artifacts(run_id, version.tags["weights"], str(tmp_path / "average")))
    state = torch.load(folder / "model.pt", weights_only=True)
    ends = [from_bytes(manager.read_verified(manifest, "model.pt")) for manifest in (best, final)]
    torch.testing.assert_close(state["fc.weight"], (ends[0]["fc.weight"] + ends[1]["fc.weight"]) / 2)
    stale = (ends[0]["bn1.running_mean"] + ends[1]["bn1.running_mean"]) / 2
    assert not torch.allclose(state["bn1.running_mean"], stale)
    # Its tags are its own scores, measured again the same way.
    again_scored = averaged_trained(str(checkpoints), last=2, bn_batches=5, device=torch.device("cpu"))
    assert float(version.tags["val_top1"]) == again_scored.meta["val_top1"]
    # Registering the same weights again (an attempt restarted after it registered) adds no version.
    again = register_model(config("tracking.register_weights=best"), tracking_uri=uri, run_id=run_id,
                           checkpoint_url=str(checkpoints))
    assert again == f"models:/resnet18-digits/{registered['best'].version}"

    with pytest.raises(ConfigError, match=r"tracking.register_weights='ema' needs optim.ema_decay > 0"):
        load_config("quickstart", ["tracking.register_weights=ema"])
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last=3 must be >= tracking.average_last=5"):
        load_config("quickstart", ["tracking.register_weights=average"])
