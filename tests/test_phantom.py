import numpy as np

from medgen.common import data as nifti
from medgen.Generation.TrainGen.core.phantom import LESION_CLASSES, make_lesion_image, make_subject


def test_deterministic_by_seed():
    a, b, c = make_subject(3, 1, (32, 32, 24)), make_subject(3, 1, (32, 32, 24)), make_subject(4, 1, (32, 32, 24))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["bravo"], c["bravo"])
    assert np.array_equal(make_lesion_image(0, 1, 2), make_lesion_image(0, 1, 2))


def test_tumours_appear_where_the_mask_says():
    found = 0
    for i in range(6):
        v = make_subject(0, i)
        mask = np.isin(v["seg"], (1, 4))                    # the tumour: necrotic core and enhancing rim
        if not mask.any():
            continue
        found += 1
        core = mask & (v["t1_gd"] - v["t1_pre"] > 0.3)
        # enhancement lies inside the mask, not outside it; T1-pre shows no rim
        assert core.sum() > 0.2 * mask.sum()
        outside = ~mask
        assert ((v["t1_gd"] - v["t1_pre"])[outside] > 0.3).mean() < 0.01
        # edema: bright on bravo around the tumour (dilated shell), not bright on T1-pre there
        from scipy.ndimage import binary_dilation
        shell = binary_dilation(mask, iterations=2) & ~mask
        assert v["bravo"][shell].mean() > 0.7 > v["t1_pre"][shell].mean()
        # the label map says which is which: the rim (ET, 4) enhances, the edema (ED, 2) is bright on bravo
        et, ed = v["seg"] == 4, v["seg"] == 2
        assert (v["t1_gd"] - v["t1_pre"])[et].mean() > 0.3 > (v["t1_gd"] - v["t1_pre"])[ed].mean()
        assert v["bravo"][ed].mean() > v["bravo"][~(mask | ed)].mean() + 0.2
    assert found >= 3


def test_written_volumes_read_back_in_original_layout(demo_root):
    lay = nifti.LAYOUTS["original"]
    splits = nifti.find_splits(demo_root / "brain", lay, 0.2, 0)
    assert set(splits) == {"train", "val", "test"} and [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    vols, problems = nifti.load_subject(splits["train"][0], lay, ["bravo", "t1_pre", "t1_gd", "seg"])
    assert not [p for p in problems if p.fatal] and vols["bravo"].shape == (32, 32, 24)
    assert sorted(p.name for p in (demo_root / "lesions").iterdir()) == sorted(LESION_CLASSES)
