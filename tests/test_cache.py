import os
import time

import torch

from medgen.Generation.TrainGen.core.config import build_config
from medgen.common.dataset import load_split
from tests.helpers_nifti import mask_volume, pattern_volume, save


def dataset(root):
    for i in range(2):
        save(root / "train" / f"s{i}" / "bravo.nii.gz", pattern_volume("ring"))
        save(root / "train" / f"s{i}" / "seg.nii.gz", mask_volume())
    return root


def cached(root, cache, **data):
    cfg = build_config({"data": {"image_size": 16, **data}})
    out = load_split(cfg.data, root, "train", ["bravo", "seg"], cache)
    files = sorted(cache.glob("*.pt"))
    assert len(files) == 1  # the stale entry of the same split is pruned
    return out, files[0], files[0].stat().st_mtime_ns


def test_cache_rebuilds_on_change_and_not_otherwise(tmp_path):
    root, cache = dataset(tmp_path / "d"), tmp_path / "cache"
    first, path, mtime = cached(root, cache)
    again, path2, mtime2 = cached(root, cache)
    assert (path2, mtime2) == (path, mtime) and torch.equal(first.images, again.images)

    changed, path3, _ = cached(root, cache, image_size=24)              # a preprocessing parameter
    assert path3 != path and changed.images.shape[-1] == 24
    _, path4, _ = cached(root, cache, image_size=24, positive_only=True)
    assert path4 != path3

    target = root / "train" / "s1" / "bravo.nii.gz"                     # a source file's content
    vol = pattern_volume("left")
    save(target, vol)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    rebuilt, path5, _ = cached(root, cache, image_size=24, positive_only=True)
    assert path5 != path4
    assert not torch.equal(rebuilt.images[-1], changed.images[-1])


def test_cache_disabled_writes_nothing(tmp_path):
    root, cache = dataset(tmp_path / "d"), tmp_path / "cache"
    cfg = build_config({"data": {"image_size": 16, "cache": False}})
    load_split(cfg.data, root, "train", ["bravo", "seg"], None)
    assert not cache.exists()


def test_batches_cover_each_rank_disjointly(tmp_path):
    root = dataset(tmp_path / "d")
    cfg = build_config({"data": {"image_size": 16, "cache": False}})
    data = load_split(cfg.data, root, "train", ["bravo", "seg"], None)
    r0 = data.batch_indices(3, epoch=1, seed=5, rank=0, world=2)
    r1 = data.batch_indices(3, epoch=1, seed=5, rank=1, world=2)
    assert r0.shape == r1.shape == (2, 3)
    assert not set(r0.flatten().tolist()) & set(r1.flatten().tolist())
    assert torch.equal(r0, data.batch_indices(3, epoch=1, seed=5, rank=0, world=2))
    assert not torch.equal(r0, data.batch_indices(3, epoch=2, seed=5, rank=0, world=2))
    batch = data.batch(r0[0])
    assert batch["images"].dtype == torch.float32 and batch["masks"].shape == (3, 1, 16, 16)
