"""Device placement: every builder is given the training context's GPU, never local_rank or the current device.

Under Ray every worker sees all of a node's GPUs, so a worker's GPU index and its local rank can differ. The
context below says so (GPU 3, local rank 0); no GPU is needed to read what the code would pass.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import trainer.engine
from configs import load_config
from data_pipeline.dali import dali_device_id
from trainer.dist import DistContext
from trainer.strategy.ddp import ddp_device_ids
from trainer.strategy.deepspeed import deepspeed_device_rank

GPU3 = DistContext(rank=1, local_rank=0, world_size=2, device=torch.device("cuda", 3))
CPU = DistContext(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[2]


def test_ddp_dali_and_deepspeed_take_the_context_gpu() -> None:
    assert ddp_device_ids(GPU3.device) == [3] and ddp_device_ids(CPU.device) is None
    assert dali_device_id(GPU3.device) == 3 and dali_device_id(CPU.device) is None
    assert deepspeed_device_rank(GPU3) == 3 and deepspeed_device_rank(CPU) == 1
    with pytest.raises(ValueError, match="needs the GPU's index"):
        dali_device_id(torch.device("cuda"))  # "the current GPU" is not a placement
    with pytest.raises(ValueError, match="names its GPU"):
        DistContext(rank=0, local_rank=0, world_size=1, device=torch.device("cuda"))


class Stop(Exception):
    """Ends the run once the arguments were read."""


def test_the_engine_hands_the_context_gpu_to_every_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real_build_loaders = trainer.engine.build_loaders

    def loaders(cfg, *, device, rank, world_size, **kwargs):  # noqa: ANN001, ANN202
        seen.update(loaders=device, rank=rank, world_size=world_size)
        # Real loaders on the CPU, shaped for this rank: the engine goes on to the model.
        return real_build_loaders(cfg, device=torch.device("cpu"), rank=rank, world_size=world_size, **kwargs)

    def model(model, device, **kwargs):  # noqa: ANN001, ANN202
        seen["model"] = device
        raise Stop

    monkeypatch.setattr(trainer.engine, "apply_device_settings", lambda device, cfg: seen.setdefault("settings",
                                                                                                      device))
    monkeypatch.setattr(trainer.engine, "build_loaders", loaders)
    monkeypatch.setattr(trainer.engine, "prepare_model", model)
    cfg = load_config("quickstart", ["data.dataset=synthetic", "data.synthetic_images=256", "data.batch_size=8",
                                     "data.synthetic_classes=10", "distributed.strategy=ddp"])
    with pytest.raises(Stop):
        trainer.engine.run(cfg, GPU3, [])
    assert seen == {"settings": GPU3.device, "loaders": GPU3.device, "rank": 1, "world_size": 2,
                    "model": GPU3.device}


def test_no_library_code_places_anything_by_local_rank() -> None:
    # local_rank means "the process's place on its node", which torchrun maps to a GPU; anywhere else a GPU
    # chosen from it is the defect this file guards against. The allowed readers, each reviewed:
    allowed = {
        "trainer/dist.py",  # init_distributed: torchrun's contract, local rank = GPU index
        "trainer/strategy/deepspeed.py",  # the LOCAL_RANK variable DeepSpeed insists on; device from the context
        "launch/orchestration/local.py",  # reads torchrun's environment
        "launch/orchestration/ray_launcher.py",  # builds the context from Ray's
    }
    readers = set()
    for package in ("configs", "data_pipeline", "trainer", "launch"):
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            if any(isinstance(node, ast.Attribute) and node.attr in ("local_rank", "current_device")
                   for node in ast.walk(tree)):
                readers.add(str(path.relative_to(REPO)))
    assert readers <= allowed, f"placement by local_rank or the current device in {sorted(readers - allowed)}"


# torch.cuda functions that act on the current GPU when given no device.
CURRENT_GPU_DEFAULTS = {"get_device_name", "get_device_properties", "get_rng_state", "set_rng_state",
                        "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "mem_get_info",
                        "synchronize", "utilization"}


def unplaced_gpu_uses(tree: ast.AST) -> list[str]:
    """Where code names a GPU without the context: `torch.device("cuda")` or "cuda:0" as a literal, a
    torch.cuda call that falls back to the current GPU, a command's one-process context in library code."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute | ast.Name):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        owner = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
        literals = [n.value for arg in node.args[:1] for n in ast.walk(arg) if isinstance(n, ast.Constant)]
        if (owner, name) == ("torch", "device") and len(node.args) == 1 and any(
                isinstance(value, str) and value.startswith("cuda") for value in literals):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif owner == "torch.cuda" and name in CURRENT_GPU_DEFAULTS and not node.args and not node.keywords:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name == "single_process_context":
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_library_code_falls_back_to_the_current_gpu_or_gpu_0() -> None:
    # A Ray worker sees all of its node's GPUs: the run-end gate, the summary and the benches name the
    # context's GPU. Only commands that are one process by nature build their own context.
    commands = {"launch/cli.py", "launch/cli_bench.py", "launch/cli_models.py", "launch/orchestration/local.py",
                "trainer/dist.py",
                *(str(p.relative_to(REPO)) for p in (REPO / "launch" / "bench").glob("*.py"))}
    offenders = {}
    for package in ("configs", "data_pipeline", "trainer", "launch"):
        for path in (REPO / package).rglob("*.py"):
            uses = unplaced_gpu_uses(ast.parse(path.read_text()))
            if str(path.relative_to(REPO)) in commands:
                uses = [use for use in uses if "single_process_context" not in use]
            if uses:
                offenders[str(path.relative_to(REPO))] = uses
    assert offenders == {}
    # Negative control: the scan finds each kind.
    found = unplaced_gpu_uses(ast.parse('torch.device("cuda" if ok else "cpu")\ntorch.cuda.get_device_name()\n'
                                        'evaluate(device=single_process_context().device)\ntorch.device("cuda", 3)'))
    assert [use.split(":")[0] for use in found] == ["line 1", "line 2", "line 3"]
