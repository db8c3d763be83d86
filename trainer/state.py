"""Turning the training state into checkpoint files and back.

Files of a step: `model.pt` (the unwrapped model's state dict: torchvision-compatible), `ema.pt` (the
weight average, when on), the strategy's files (`train_state.pt`, optimizer and gradient scaler, for
single/DDP; `deepspeed.*`, the engine's own checkpoint, for DeepSpeed) and `rank_<r>.pt` (each rank's
random generator states). Facts needed to decide whether a checkpoint fits this run live in the manifest's meta,
readable without torch.load.
Every file loads with `weights_only=True`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from configs.errors import IncompatibleSettings
from configs.loader import config_to_dict
from configs.schema import RunConfig
from trainer.checkpoint import CheckpointCorrupt, CheckpointManager, CheckpointUnreadable, Manifest
from trainer.dist import DistContext, all_reduce_max, barrier, gather_objects
from trainer.ema import Ema
from trainer.lease import WriterLease, check_writer_lease
from trainer.metrics import MetricSink
from trainer.serialize import from_bytes, to_bytes
from trainer.strategy import Strategy


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generator states (torch CPU, the CUDA generator of its own `device` when that is a GPU,
    numpy, python) as weights-only-loadable data."""
    _, keys, pos, has_gauss, cached_gaussian = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any], device: torch.device, *, source: str) -> None:
    """Put back what `capture_rng` took (read from `source`, named in errors) on this process's `device`."""
    torch.set_rng_state(state["torch"])
    if (cuda := cuda_state_for(state["cuda"], device, source=source)) is not None:
        torch.cuda.set_rng_state(cuda, device)
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))


def cuda_state_for(saved: torch.Tensor | list[torch.Tensor] | None, device: torch.device, *,
                   source: str) -> torch.Tensor | None:
    """The CUDA generator state to restore on `device` from what a rank saved: its own GPU's state (None:
    it trained on a CPU, nothing to restore). Checkpoints written before this rule saved a list, the state
    of every GPU the process saw, indexed by device; the one of `device` is taken from it. A state that has
    no GPU to go to here is refused: the resume would not be exact."""
    index = device.index or 0
    if isinstance(saved, list):
        if not saved:
            return None
        if device.type == "cuda" and index < len(saved):
            return saved[index]
        raise IncompatibleSettings(
            f"{source} holds the CUDA generator states of {len(saved)} GPUs, and this rank trains on {device}: "
            "it cannot continue that rank's random draws exactly. Resume where each process sees as many GPUs "
            "as the run that wrote it, or at another world size (generator states are then not restored)")
    if saved is None:
        return None
    if device.type != "cuda":
        raise IncompatibleSettings(
            f"{source} holds the CUDA generator state of a rank that trained on a GPU, and this rank trains on "
            f"{device}: resume it on GPUs, or at another world size (generator states are then not restored)")
    return saved


def architecture(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint's weights fit: model name, classes, stem and BlurPool."""
    # blurpool only when on: checkpoints written before it existed still fit a run without it.
    return {"name": cfg.model.name, "num_classes": cfg.model.num_classes, "small_input": cfg.model.small_input,
            **({"blurpool": True} if cfg.model.blurpool else {})}


def check_compatible(manifest: Manifest, url: str, cfg: RunConfig, *, global_batch_size: int) -> None:
    """Refuse a checkpoint of another architecture, or one whose steps mean other batches, naming both."""
    saved = manifest.meta["architecture"]
    wanted = architecture(cfg)
    if saved != wanted:
        raise IncompatibleSettings(f"checkpoint {url} holds {saved}, but this run builds {wanted} (model.*): "
                                   "point checkpoint.url elsewhere or change the model config")
    if manifest.meta["global_batch_size"] != global_batch_size:
        raise IncompatibleSettings(
            f"checkpoint {url} was trained with a global batch of {manifest.meta['global_batch_size']} images, this "
            f"run uses {global_batch_size} (data.batch_size x world size): resuming would change which images each "
            "step sees")


def checkpoint_meta(cfg: RunConfig, *, step: int, steps_per_epoch: int, global_batch_size: int, world_size: int,
                    val: dict[str, float] | None) -> dict[str, Any]:
    """The manifest facts of a step."""
    return {
        "step": step,
        "epoch": step / steps_per_epoch,
        "global_batch_size": global_batch_size,
        "world_size": world_size,
        "architecture": architecture(cfg),
        **(val or {}),
        "config": config_to_dict(cfg),
    }


def save_state(manager: CheckpointManager, step: int, strategy: Strategy, ema: Ema | None, ctx: DistContext, *,
               meta: dict[str, Any], lease: WriterLease | None = None) -> None:
    """Write checkpoint `step` from every rank and commit it: rank 0 writes the model and EMA (identical on
    every rank), each rank its own generator states and its share of the strategy's files; rank 0 commits
    once all have written, if the primary still holds `lease` (checked on every rank, so all stop together)."""
    if ema is not None:
        ema.sync_buffers()
    strategy.sync_buffers()  # the saved BatchNorm statistics are the ones every rank evaluates with
    files = {f"rank_{ctx.rank}.pt": to_bytes({"rng": capture_rng(ctx.device)}), **strategy.save_files()}
    if ctx.is_primary:
        files["model.pt"] = to_bytes(strategy.unwrapped().state_dict())
        if ema is not None:
            files["ema.pt"] = to_bytes(ema.state_dict())
    written = manager.write(step, files)
    # Every rank's report reaches rank 0 once all have written: the manifest lists what was written, not
    # what a listing of the folder shows (stale on some shared file systems).
    reports = gather_objects(written)
    check_writer_lease(lease, ctx)  # taken over while the files were written: the step is never committed
    if ctx.is_primary:
        manager.commit(step, meta, {name: record for report in reports for name, record in report.items()})
    barrier()


def verify_step(manager: CheckpointManager, manifest: Manifest,
                strategy: Strategy) -> tuple[str | None, dict[str, bytes]]:
    """Read every file of committed step `manifest` and check it: why the step is damaged (a file whose
    size or hash differs from the manifest, or that holds more than weights and plain data), or None when
    every file checks out; and the files read, for `load_state` (so a resume reads each file once). A storage
    error is not damage: the read is retried and then raises `CheckpointUnreadable`."""
    files: dict[str, bytes] = {}
    for name in manifest.files:
        try:
            files[name] = manager.read_verified(manifest, name)
        except CheckpointCorrupt as error:
            return str(error), {}
        try:
            strategy.check_file(name, files[name])
        except Exception as error:  # the unpickler raises several types; all mean "not plain weights"
            reason = _unpickler_reason(error)
            return f"{manager.url(manifest.step)}/{name}: does not load as weights only ({reason})", {}
    return None, files


def _unpickler_reason(error: Exception) -> str:
    """The line of torch's weights-only refusal that says what was found (its message is a page long)."""
    text = str(error)
    _, found, rest = text.partition("WeightsUnpickler error:")
    reason = rest.strip().split("\n\n")[0] if found else text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {' '.join(reason.split())}"


def load_state(manager: CheckpointManager, manifest: Manifest, strategy: Strategy, ema: Ema | None,
               ctx: DistContext, *, files: dict[str, bytes] | None = None) -> None:
    """Restore model, EMA, optimizer, scaler and this rank's generators from a committed step (from `files`,
    what `verify_step` read, when given; else each file is read and checked here)."""
    step = manifest.step

    def read(name: str) -> bytes:
        return files[name] if files is not None else manager.read_verified(manifest, name)

    strategy.unwrapped().load_state_dict(from_bytes(read("model.pt")))
    strategy.load_files(sorted(manifest.files), read)
    if ema is not None:
        if "ema.pt" in manifest.files:
            ema.load_state_dict(from_bytes(read("ema.pt")))
        else:
            # Turning the average on for a run that had it off: start it from the current weights.
            ema.reset(strategy.unwrapped())
    if manifest.meta["world_size"] == ctx.world_size:
        rank_file = f"rank_{ctx.rank}.pt"
        restore_rng(from_bytes(read(rank_file))["rng"], ctx.device, source=f"{manager.url(step)}/{rank_file}")
    elif ctx.is_primary:
        # Data order and augmentation depend only on (seed, epoch, step), so the run stays exact for the
        # training itself; only generators that other code may draw from start afresh.
        warnings.warn(f"checkpoint {manager.url(step)} was written by {manifest.meta['world_size']} ranks, this run "
                      f"has {ctx.world_size}: random generator states are not restored", stacklevel=2)


@dataclass(frozen=True, slots=True)
class Resumed:
    """Where a start resumes: the committed step loaded, or a fresh start."""

    step: int = 0
    """The step to continue from (0: a fresh run)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """That step's manifest meta (empty for a fresh run)."""

    @property
    def val(self) -> dict[str, float]:
        """The validation scores saved with the step (empty unless it ended an epoch)."""
        return {k: v for k, v in self.meta.items() if k.startswith(("val_", "ema_val_"))}


@dataclass(frozen=True, slots=True)
class Checkpointer:
    """The run's side of its checkpoints: `resume()` at start-up (which makes every start a resume) and
    `save(step)` with the manifest facts, announced to the sinks. Without a checkpoint URL both do nothing."""

    manager: CheckpointManager | None
    """Where checkpoints go (None: checkpoint.url is not set)."""
    cfg: RunConfig
    """The run's config, recorded in every manifest."""
    strategy: Strategy
    """Model, optimizer and the strategy's own files."""
    ema: Ema | None
    """The weight average, if on."""
    ctx: DistContext
    """This process's place in the job."""
    sinks: Sequence[MetricSink]
    """Told of every committed checkpoint."""
    steps_per_epoch: int
    """For the manifest's epoch."""
    global_batch_size: int
    """Recorded, and checked on resume: a step means the same images only with the same global batch."""
    classes: tuple[str, ...] = ()
    """The data set's class names (label i is classes[i]), recorded so that a checkpoint describes its outputs."""
    extra_meta: Callable[[], dict[str, Any]] | None = None
    """On the primary process: more facts for each manifest at the moment it is written."""
    lease: WriterLease | None = None
    """On the primary process: the run's hold on the checkpoint URL, checked before each save."""

    def resume(self) -> Resumed:
        """Load the newest good committed step if there is one (refusing one that does not fit this run);
        return the step to continue from (0 for a fresh run) and what was saved with it. A step
        whose files fail their check (hash, weights-only load) is reported, moved aside and the one before it
        is tried; all ranks agree on the step. None loading at all is an error: nothing is overwritten then.
        A storage that keeps failing (`CheckpointUnreadable`, after retries) ends the start on every rank
        and moves nothing: a good step is never mistaken for a damaged one because the storage was down."""
        if self.manager is None:
            return Resumed()
        committed = self.manager.committed()
        problems = []
        for manifest in reversed(committed):
            check_compatible(manifest, self.manager.url(manifest.step), self.cfg,
                             global_batch_size=self.global_batch_size)
            unreadable: CheckpointUnreadable | None = None
            try:
                problem, files = verify_step(self.manager, manifest, self.strategy)
            except CheckpointUnreadable as error:
                unreadable, problem, files = error, None, {}
            # 0: the step loads; 1: it is damaged (on some rank); 2: the storage failed (on some rank).
            outcome = 2.0 if unreadable is not None else float(problem is not None)
            outcome = all_reduce_max(torch.tensor(outcome, device=self.ctx.device)).item()
            if outcome == 2:
                raise unreadable or CheckpointUnreadable(
                    f"{self.manager.url(manifest.step)}: another rank's storage failed to read it (see its error); "
                    "every checkpoint is where it was")
            if outcome == 0:
                load_state(self.manager, manifest, self.strategy, self.ema, self.ctx, files=files)
                return Resumed(step=manifest.step, meta=manifest.meta)
            problem = problem or "another rank found a file of this step damaged"
            problems.append(problem)
            if self.ctx.is_primary:
                # The run will reach this step again and write it anew: keep the damaged one beside it.
                aside = self.manager.set_aside(manifest.step)
                print(f"checkpoint {self.manager.url(manifest.step)} is not used: {problem}; it was moved to "
                      f"{aside}, trying the committed step before it", flush=True)
            barrier()
        if problems:
            raise CheckpointCorrupt(f"no committed checkpoint under {self.manager.storage.url} loads: "
                                    + "; ".join(problems))
        return Resumed()

    def save(self, step: int, val: dict[str, float] | None = None, *, progress: dict[str, Any] | None = None) -> None:
        """Write and commit checkpoint `step` on every rank (with `val`, the epoch's scores, when it ends one,
        and `progress`, run state that the loop keeps in the manifest meta, such as its time to accuracy)."""
        if self.manager is None:
            return
        check_writer_lease(self.lease, self.ctx)  # a run that was taken over stops here, writing nothing
        meta = checkpoint_meta(self.cfg, step=step, steps_per_epoch=self.steps_per_epoch,
                               global_batch_size=self.global_batch_size, world_size=self.ctx.world_size, val=val)
        meta.update(progress or {})
        meta["classes"] = list(self.classes)
        if self.extra_meta is not None:
            meta.update(self.extra_meta())
        save_state(self.manager, step, self.strategy, self.ema, self.ctx, meta=meta, lease=self.lease)
        for sink in self.sinks:
            sink.on_checkpoint(step, self.manager.url(step))

    def where(self, step: int) -> str:
        """Where checkpoint `step` is, for messages."""
        return self.manager.url(step) if self.manager is not None else "nowhere (checkpoint.url is not set)"
