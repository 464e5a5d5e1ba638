import shutil

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader

from medsegdiff_monai.data import load_brats_datalist, make_slice_dataset
from medsegdiff_monai.transforms import get_train_transforms


def test_volumes_are_decoded_once_and_cached_cropped(tmp_path, synthetic_brats_dir, synthetic_datalist):
    data_dir = tmp_path / "brats"
    shutil.copytree(synthetic_brats_dir, data_dir)
    entries = load_brats_datalist(data_dir / "datalist.json", "training", data_dir)[:3]
    chain = get_train_transforms(roi_size=(32, 32), num_slices_per_volume=4)
    dataset = make_slice_dataset(entries, chain, copy_cache=False)

    for entry, cached in zip(entries, dataset._cache, strict=True):
        brain = np.asarray(nib.load(entry["image"][0]).dataobj) > 0
        bbox = [int(np.ptp(np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != k))))) + 1 for k in range(3)]
        assert tuple(cached["image"].shape) == (4, *bbox)  # the cache holds the brain-cropped volume
        assert cached["label"].dtype == torch.uint8
    before = [c["image"].clone() for c in dataset._cache]
    operations = [len(c["image"].applied_operations) for c in dataset._cache]

    shutil.rmtree(data_dir)  # every epoch must come from the cache
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0)
    for _ in range(2):
        batches = list(loader)
        assert sum(b["image"].shape[0] for b in batches) == 3 * 4
        assert batches[0]["image"].shape[1:] == (4, 32, 32) and batches[0]["grade"].dtype == torch.long
    # the random steps never modify the cached volume in place
    assert all(torch.equal(b, c["image"]) for b, c in zip(before, dataset._cache, strict=True))
    assert [len(c["image"].applied_operations) for c in dataset._cache] == operations
