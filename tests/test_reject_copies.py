"""generate.py --reject_copies: the copy distance against a direct computation, the threshold is the memorization
audit's (the 1st-percentile order statistic of the validation images' copy distances), rejected samples are redrawn from their next seed, and the
manifest records attempts, distance and the seed that was kept."""
import csv

import numpy as np
import pytest
import torch

from medgen.common.neighbours import CANDIDATES, SCALES, SMOOTH, CopyIndex, rescale, smooth
from medgen.common.errors import UserError
from medgen.Generation.TrainGen.core.generate import COPY, Job, draw_checked
from medgen.Generation.TrainGen.core.generation.copies import CopyCheck
from medgen.Generation.TrainGen.core.generation.models import load_model
from medgen.Generation.TrainGen.core.phantom import make_subject
from medgen.Generation.TrainGen.generate import main as generate_main


@pytest.fixture(scope="module")
def rflow_model(tiny_models):
    return load_model(tiny_models["bravo_rflow"], "--image_model", torch.device("cpu"), None, "euler", 3)


def best_r_by_hand(search: np.ndarray, tmpl: np.ndarray) -> float:
    """The largest Pearson correlation of tmpl with any window of search, every position tried."""
    h, w = tmpl.shape[-2:]
    best = -1.0
    for y in range(search.shape[-2] - h + 1):
        for x in range(search.shape[-1] - w + 1):
            patch = search[..., y:y + h, x:x + w].ravel()
            if patch.std() > 1e-9 and tmpl.std() > 1e-9:
                best = max(best, np.corrcoef(patch, tmpl.ravel())[0, 1])
    return best


def copy_distance_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    """The copy distance written out (common/neighbours.py): both blurred, over the four flips of the query, its
    centre window moved over the training image, and for every crop size down to 80% the smaller of the resized
    one and the other image slid over every position of the larger; sqrt(2 - 2 r) of the best."""
    n = a.shape[-1]
    m = n // 8
    a, b = smooth(a.float(), SMOOTH * n / 64).double(), smooth(b.float(), SMOOTH * n / 64).double()
    best = -1.0
    for q in (a, a.flip(-1), a.flip(-2), a.flip(-1, -2)):
        best = max(best, best_r_by_hand(b.numpy(), q[..., m:n - m, m:n - m].numpy()))
        for size in range(n - 1, int(min(SCALES) * n) - 1, -1):
            best = max(best, best_r_by_hand(b.numpy(), rescale(q, size)[..., 1:size - 1, 1:size - 1].numpy()),
                       best_r_by_hand(q.numpy(), rescale(b, size)[..., 1:size - 1, 1:size - 1].numpy()))
    return float(np.sqrt(max(2 - 2 * best, 0.0)))


def test_copy_distance_against_a_direct_computation():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.random((5, 1, 16, 16)))
    queries = torch.cat([torch.from_numpy(rng.random((2, 1, 16, 16))), train[:1].roll(1, -1), train[1:2].flip(-1),
                         train[2:3].flip(-2), rescale(train[3:4, ..., 1:15, 1:15], 16)])
    d, j = CopyIndex(train).query(queries)       # 5 training images: all of them are searched exactly
    want = np.array([[copy_distance_by_hand(q, t) for t in train] for q in queries])
    assert d == pytest.approx(want.min(1), abs=1e-6) and (j == want.argmin(1)).all()   # sqrt of float64 round-off
    assert (d[2:5] < 1e-6).all()                 # rolled, mirrored and flipped training images are copies
    assert d[5] < want[:2].min() / 2             # a crop resized: far closer than unrelated images


def test_candidates_hold_the_source_of_transformed_copies():
    """With more training images than CANDIDATES, the exact search sees only the descriptor's nearest: the
    source of a moved, flipped or cropped copy is among them."""
    vols = [make_subject(5, i, (64, 64, 24))["bravo"] for i in range(6)]
    train = torch.from_numpy(np.concatenate([np.moveaxis(v, -1, 0)[6:18] for v in vols]))[:, None]
    assert len(train) > 4 * CANDIDATES
    x = train[::5]
    moved = torch.zeros_like(x)
    moved[..., 5:, :61] = x[..., :-5, 3:]
    index = CopyIndex(train)
    for copies in (moved, x.flip(-2), x.flip(-1, -2), rescale(x[..., 6:58, 6:58], 64)):
        d, j = index.query(copies)
        assert (j == np.arange(0, len(train), 5)).all() and d.max() < 0.15


def test_threshold_is_the_heldout_order_statistic(rflow_model):
    from medgen.Generation.TrainGen.core.datasource import data_source
    check = CopyCheck.for_model(rflow_model)
    src = data_source(rflow_model.cfg)
    train, val = src.split(rflow_model.cfg.data, "train"), src.split(rflow_model.cfg.data, "val")
    d = CopyIndex(train.images[:, :1].float()).query(val.images[:, :1].float())[0]
    k = max(1, round(0.01 * (len(d) + 1)))
    assert check.threshold == pytest.approx(np.sort(d)[k - 1])
    assert check.distances(train.images[:3, :1].float()).max() < 1e-6          # a training image is a copy
    assert check.distances(train.images[:3, :1].float().roll(2, -2)).max() < 1e-6   # moved by 2 px: still one
    assert check.distances(train.images[:3, :1].float().flip(-2)).max() < 1e-6      # flipped: still one


def test_rejected_samples_are_redrawn_from_their_next_seed(rflow_model, tmp_path):
    cond = {"concat": (torch.rand(3, 1, 32, 32) > 0.9).float() * 2 - 1}
    job = Job(mode="bravo", output_dir=tmp_path, num_images=3, batch_size=3, image_model=rflow_model, max_attempts=2)
    plain, _ = draw_checked(job, rflow_model, [0, 1, 2], cond)
    blank = CopyIndex(torch.zeros(1, 1, 32, 32))
    job.copy_check = CopyCheck(blank, 0.0, 1, 1)                                   # nothing is a copy
    same, fields = draw_checked(job, rflow_model, [0, 1, 2], cond)
    assert torch.equal(same, plain) and all(f["copy_rejections"] == 0 for f in fields.values())
    job.copy_check = CopyCheck(blank, 10.0, 1, 1)                                  # everything is
    redrawn, fields = draw_checked(job, rflow_model, [0, 1, 2], cond)
    assert all(f["copy_rejections"] == 2 for f in fields.values())                            # max_attempts
    assert job.rejections[COPY] == 6 and not torch.equal(redrawn, plain)
    job2 = Job(mode="bravo", output_dir=tmp_path, num_images=3, batch_size=3, image_model=rflow_model, seed=0)
    from medgen.Generation.TrainGen.core.generate import draw
    from medgen.Generation.TrainGen.core.generation.writers import IMAGE_STREAM, sample_seed
    direct = draw(job2, rflow_model, [sample_seed(0, i, IMAGE_STREAM, 2) for i in range(3)], cond)
    assert torch.equal(redrawn, direct)                      # the kept sample is its attempt-2 seed's, as recorded
    assert fields[1]["sample_seed"] == sample_seed(0, 1, IMAGE_STREAM, 2)


def test_reject_copies_end_to_end(tiny_models, demo_root, tmp_path, capsys):
    out = tmp_path / "synth"
    assert generate_main(["--image_model", str(tiny_models["bravo_rflow"]), "--masks_from", str(demo_root / "brain"),
                          "--num_images", "4", "--num_steps", "3", "--reject_copies", "--output_dir", str(out),
                          "--device", "cpu"]) == 0
    assert "reject copies: copy distance threshold" in capsys.readouterr().out
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["copy_rejections"] != "" and float(r["copy_distance"]) >= 0 for r in rows)
    with pytest.raises(UserError, match="--reject_copies applies to image modes"):
        generate_main(["--seg_model", str(tiny_models["seg"]), "--num_images", "2", "--reject_copies",
                       "--output_dir", str(tmp_path / "m"), "--device", "cpu"])
