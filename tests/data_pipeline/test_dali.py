"""The DALI loader on CPU threads against the baseline: the same samples, windows and flips, each image agreeing
to decoder/resampler rounding, rank shards that split each epoch without overlap, and decode errors that name
the file."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from configs.schema import DataConfig
from data_pipeline import DatasetError, build_loaders
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, erase_box_for
from data_pipeline.auto_augment import auto_augment_for
from data_pipeline.prepare import prepare_index
from data_pipeline.dali import DaliLoader
from data_pipeline.sharding import SampleKey

NUM_COLOURS = 23


def config(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(dataset="folder", root=str(root), batch_size=32, dali_threads=2, image_size=32,
                      min_crop_area=0.25, loader="dali")
    return dataclasses.replace(base, **changes)


def batches(cfg: DataConfig, *, seed: int = 0, split: str = "train", epoch: int = 0, rank: int = 0,
            world_size: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loaders = build_loaders(cfg, seed=seed, rank=rank, world_size=world_size, dtype=dtype)
    return list(getattr(loaders, split).iter_epoch(epoch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dali_and_the_baseline_deliver_the_same_batches(digits_root: Path, dtype: torch.dtype) -> None:
    for split in ("train", "val"):
        dali = batches(config(digits_root), split=split, dtype=dtype)
        torch_ = batches(config(digits_root, loader="torch"), split=split, dtype=dtype)
        assert len(dali) == len(torch_) and len(dali) == (45 if split == "train" else 12)
        for (dali_images, dali_labels), (torch_images, torch_labels) in zip(dali, torch_, strict=True):
            assert dali_images.shape == torch_images.shape and dali_images.dtype == torch_images.dtype == dtype
            assert dali_images.stride() == torch_images.stride()  # both channels-last
            assert torch.equal(dali_labels, torch_labels) and dali_labels.dtype == torch.int64
        # Per image: two JPEG decoders and two bilinear resamplers differ by rounding, about one grey level
        # (1/255/0.229 = 0.017 in normalised units) at most on average over an image.
        difference = torch.cat([per_image(a - b) for (a, _), (b, _) in zip(dali, torch_, strict=True)])
        assert difference.max() < 0.03, (split, difference.argmax())
        # The same bound checks each sample's flip: every image differs from its mirror image by far more.
        mirrored = torch.cat([per_image(a - b.flip(-1)) for (a, _), (b, _) in zip(dali, torch_, strict=True)])
        assert mirrored.min() > 0.1, (split, mirrored.argmin())
    # Negative control: other crops (another seed) of the same images differ by far more than that.
    other = batches(config(digits_root, loader="torch"), seed=1)
    dali = batches(config(digits_root))
    shifted = torch.cat([per_image(a - b) for (a, _), (b, _) in zip(dali, other, strict=True)])
    assert shifted.mean() > 0.3


def per_image(difference: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference of each image of a batch."""
    return difference.abs().float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def colours_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NUM_COLOURS flat-coloured JPEGs of several sizes, each its own sample id: any crop of image i, flipped
    or not, decodes to colour i."""
    root = tmp_path_factory.mktemp("colours")
    for split in ("train", "val"):
        for i in range(NUM_COLOURS):
            folder = root / split / f"c{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (50 + 7 * i, 40 + 3 * (NUM_COLOURS - i))
            Image.new("RGB", size, (10 * i, 128, 128)).save(folder / f"{i:02d}.JPEG", quality=95)
    prepare_index(root, num_workers=1)
    return root


def sample_ids(images: torch.Tensor) -> list[int]:
    """Which flat colour each image is (its red level / 10)."""
    red = images[:, 0].float().mean(dim=(1, 2)) * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255
    assert (images[:, 0].float().std(dim=(1, 2)) < 0.05).all()  # flat: the crop came from one image
    return [round(value / 10) for value in red.tolist()]


def test_two_ranks_split_each_training_epoch_without_overlap(colours_root: Path) -> None:
    cfg = config(colours_root, batch_size=3)
    epochs = []
    for epoch in (0, 1):
        shards = [[i for images, _ in batches(cfg, epoch=epoch, rank=rank, world_size=2) for i in sample_ids(images)]
                  for rank in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == 9  # 23 // (3 x 2) full global batches on each rank
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0] + shards[1])) == 18
        epochs.append(shards)
    assert epochs[0] != epochs[1]  # each epoch is a new permutation


def test_two_ranks_evaluate_every_val_image_exactly_once(colours_root: Path) -> None:
    cfg = config(colours_root, batch_size=4)
    seen = [i for rank in (0, 1) for images, _ in batches(cfg, split="val", rank=rank, world_size=2)
            for i in sample_ids(images)]
    assert sorted(seen) == list(range(NUM_COLOURS))


def test_a_file_broken_after_indexing_is_named(tmp_path: Path, colours_root: Path) -> None:
    import shutil

    shutil.copytree(colours_root, tmp_path / "data")
    broken = tmp_path / "data" / "train" / "c1" / "05.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DatasetError, match=rf"{broken}: not a decodable image.*data prepare"):
        batches(config(tmp_path / "data", batch_size=4))


def test_reader_threads_change_where_files_are_read_not_what_is_delivered(digits_root: Path) -> None:
    inline = build_loaders(config(digits_root, reader_threads=0), seed=0).train
    threaded = build_loaders(config(digits_root, reader_threads=2, reader_lookahead=3), seed=0).train
    for epoch, start in ((0, 0), (1, 7)):
        # An abandoned epoch first: what the reader threads had read ahead of it must not leak into the next.
        abandoned = threaded.iter_epoch(epoch + 5)
        next(abandoned)
        expected = list(inline.iter_epoch(epoch, start_batch=start))
        delivered = list(threaded.iter_epoch(epoch, start_batch=start))
        assert len(delivered) == len(expected) == 45 - start
        for (images, labels), (reference, reference_labels) in zip(delivered, expected, strict=True):
            assert torch.equal(labels, reference_labels) and torch.equal(images, reference)


@pytest.mark.parametrize("dynamic_executor", [True, False])
def test_batches_held_by_the_trainer_are_never_overwritten(digits_root: Path, dynamic_executor: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The loader hands DALI's own output buffers to torch (no copy). Consumed one at a time and cloned, each
    # batch is what it was when delivered; held all at once, they must still be the same.
    loader = build_loaders(config(digits_root), seed=0).train
    consumed = [images.clone() for images, _ in loader.iter_epoch(0)]
    if not dynamic_executor:
        # The negative control: DALI's static executor reuses its output buffers, so the held batches change.
        from nvidia.dali.pipeline import Pipeline

        build = Pipeline.__init__

        def static_executor(self: Pipeline, *args: object, **kwargs: object) -> None:
            build(self, *args, **{**kwargs, "exec_dynamic": False})

        static_executor.__signature__ = inspect.signature(build)  # type: ignore[attr-defined]  # pipeline_def reads it
        monkeypatch.setattr(Pipeline, "__init__", static_executor)
        loader = build_loaders(config(digits_root), seed=0).train
    held = [images for images, _ in loader.iter_epoch(0)]
    same = [torch.equal(images, reference) for images, reference in zip(held, consumed, strict=True)]
    assert all(same) == dynamic_executor, same
    # Without a copy each held batch is its own DALI buffer; the static executor cycles through 2.
    assert len({images.data_ptr() for images in held}) == (len(held) if dynamic_executor else 2)


def first_batches(cfg: DataConfig, *, seed: int = 0, start_batch: int = 0, count: int = 3) -> torch.Tensor:
    loader = build_loaders(cfg, seed=seed).train
    return torch.cat([images for images, _ in itertools.islice(loader.iter_epoch(0, start_batch), count)])


def first_keys(cfg: DataConfig, *, count: int = 3) -> list[SampleKey]:
    loader = build_loaders(cfg, seed=0).train
    assert isinstance(loader, DaliLoader)
    return [key for batch in itertools.islice(loader.sampler.batches(0), count) for key in batch]


@pytest.mark.parametrize("policy", ["trivial", "rand"])
def test_automatic_augmentation_and_erasing_agree_across_loaders_and_follow_the_seed(digits_root: Path,
                                                                                     policy: str) -> None:
    cfg = config(digits_root, auto_augment=policy, random_erasing_prob=0.5)
    dali, torch_ = first_batches(cfg), first_batches(dataclasses.replace(cfg, loader="torch"))
    keys = first_keys(cfg)
    ops = [auto_augment_for(cfg, seed=seed) for _, seed in keys]
    boxes = [erase_box_for(32, cfg, seed=seed) for _, seed in keys]
    # The same operations at the same strengths, to resampling rounding (measured max 0.066 for RandAugment's
    # two operations), except equalize: DALI follows OpenCV's formula, torchvision PIL's.
    difference = per_image(dali - torch_)
    comparable = [i for i, image_ops in enumerate(ops) if "equalize" not in {op.name for op in image_ops}]
    assert len(comparable) > 60 and difference[comparable].max() < 0.1, difference[comparable].argmax()
    # Each erased box is the mean colour (0) in both; about half the images have one.
    assert 30 < sum(box is not None for box in boxes) < 66
    for i, box in enumerate(boxes):
        if box is not None:
            for images in (dali, torch_):
                assert not images[i, :, box.top:box.top + box.height, box.left:box.left + box.width].any()
    # The augmentation happened: the same crops without it differ far more, except where the draw was identity.
    plain = per_image(dali - first_batches(config(digits_root)))
    changed = [i for i, image_ops in enumerate(ops) if {op.name for op in image_ops} != {"identity"}]
    assert plain[changed].mean() > 0.3 and plain[changed].mean() > 5 * difference[comparable].mean()
    # The seed alone decides: a later start reproduces the same images (what resume relies on); another seed
    # gives other draws.
    assert torch.equal(first_batches(cfg, start_batch=1, count=2), dali[32:])
    assert per_image(first_batches(cfg, seed=1) - dali).mean() > 0.3
