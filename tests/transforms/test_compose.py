import pytest
import torch
from monai.data import MetaTensor, get_track_meta
from monai.transforms import Compose, Lambdad, RandGaussianNoised

from medsegdiff_monai.data import load_brats_datalist, make_slice_dataset
from medsegdiff_monai.transforms import UntrackedTailCompose, get_train_transforms, meta_tracking


def test_training_chain_tail_gives_the_tracked_values_as_plain_tensors(synthetic_brats_dir, synthetic_datalist):
    entries = load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)[:2]
    untracked = get_train_transforms(roi_size=(48, 48), num_slices_per_volume=3)
    assert isinstance(untracked, UntrackedTailCompose)
    tracked = Compose(list(get_train_transforms(roi_size=(48, 48), num_slices_per_volume=3).transforms))
    datasets = [make_slice_dataset(entries, chain, copy_cache=False) for chain in (untracked, tracked)]
    for dataset in datasets:
        dataset.transform.set_random_state(seed=7)
        assert isinstance(dataset._cache[0]["image"], MetaTensor)  # the cached head keeps its metadata
    for index in (0, 1, 0, 1):
        for fast, reference in zip(datasets[0][index], datasets[1][index], strict=True):
            assert type(fast["image"]) is torch.Tensor
            for key in ("image", "label", "mask", "grade"):
                assert torch.equal(torch.as_tensor(fast[key]), torch.as_tensor(reference[key])), key
    assert get_track_meta()


def test_tail_split_runs_only_the_tail_untracked():
    seen = []
    record = Lambdad("x", lambda value: seen.append(get_track_meta()) or value)
    chain = UntrackedTailCompose([record, record, RandGaussianNoised("x", prob=1.0), record], untracked_from=2)
    chain({"x": torch.zeros(1, 4)})
    chain({"x": torch.zeros(1, 4)}, start=1)
    chain({"x": torch.zeros(1, 4)}, end=2)
    assert seen == [True, True, False, True, False, True, True]
    assert get_track_meta()


def test_tracking_is_restored_after_an_error():
    def fail(value):
        raise RuntimeError("boom")

    chain = UntrackedTailCompose([Lambdad("x", fail)], untracked_from=0)
    with pytest.raises(RuntimeError):
        chain({"x": torch.zeros(1)})
    assert get_track_meta()
    with meta_tracking(False):
        assert not get_track_meta()
    assert get_track_meta()


def test_untracked_from_out_of_range_is_refused():
    with pytest.raises(ValueError, match="untracked_from"):
        UntrackedTailCompose([Lambdad("x", lambda v: v)], untracked_from=2)
