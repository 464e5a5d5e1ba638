import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses, Invertd

from medsegdiff_monai.data import load_brats_datalist
from medsegdiff_monai.transforms import (
    get_inference_transforms,
    get_train_transforms,
    get_val_transforms,
    regions_to_brats_labels,
)

FULL_ROI = (48, 48)  # the synthetic volumes are 48 x 48 x 32: no in-plane crop, so no brain voxel is lost


@pytest.fixture(scope="module")
def entries(synthetic_brats_dir, synthetic_datalist):
    return load_brats_datalist(synthetic_datalist, "training", synthetic_brats_dir)


def raw(path):
    return np.asarray(nib.load(path).dataobj)


def test_regions_of_a_hand_made_label(tmp_path):
    label = np.zeros((8, 8, 4), dtype=np.uint8)
    label[1, 1, 0], label[2, 2, 1], label[3, 3, 2] = 1, 2, 4
    images = []
    for modality in ("t1", "t1ce", "t2", "flair"):
        images.append(str(tmp_path / f"s_{modality}.nii"))
        nib.save(nib.Nifti1Image(np.full(label.shape, 100, np.int16), np.eye(4)), images[-1])
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "s_seg.nii")
    out = get_val_transforms(roi_size=(8, 8))({"image": images, "label": str(tmp_path / "s_seg.nii"), "grade": 0})
    regions = out["label"]
    assert regions.shape == (3, 8, 8, 4) and regions.dtype == torch.float32
    tc, wt, et = (set(map(tuple, torch.nonzero(regions[c]).tolist())) for c in range(3))
    assert tc == {(1, 1, 0), (3, 3, 2)}
    assert wt == {(1, 1, 0), (2, 2, 1), (3, 3, 2)}
    assert et == {(3, 3, 2)}
    assert out["subject_id"] == "s" and int(out["grade"]) == 0


def test_bad_label_value_is_reported(tmp_path, entries):
    bad = tmp_path / "bad_seg.nii"
    label = raw(entries[0]["label"]).copy()
    label[tuple(np.argwhere(label == 4)[0])] = 3  # one voxel of BraTS 2023's ET in a BraTS 2020 map
    nib.save(nib.Nifti1Image(label, nib.load(entries[0]["label"]).affine), bad)
    with pytest.raises(RuntimeError) as error:  # MONAI's Compose wraps the transform's error
        get_val_transforms(FULL_ROI)({**entries[0], "label": str(bad)})
    assert isinstance(error.value.__cause__, ValueError)
    message = f"subject {entries[0]['subject_id']}: label file {bad} holds labels [0, 1, 2, 3, 4]: it mixes labels 3"
    assert message in str(error.value.__cause__)


def test_validation_chain_z_scores_brain_voxels(entries):
    entry = entries[0]
    out = get_val_transforms(FULL_ROI)(entry)
    image = out["image"]
    assert image.shape[:3] == (4, 48, 48) and image.dtype == torch.float32
    assert out["label"].shape == (3, *image.shape[1:]) and out["subject_id"] == entry["subject_id"]
    assert int(out["grade"]) == entry["grade"]
    for channel, path in enumerate(entry["image"]):
        values = raw(path).astype(np.float64)
        brain = values[values > 0]
        expected = np.sort((brain - brain.mean()) / brain.std())
        got = image[channel][image[channel] != 0].double().numpy()
        assert abs(got.mean()) < 1e-4 and abs(got.std() - 1.0) < 1e-4
        np.testing.assert_allclose(np.sort(got), expected, atol=1e-4)


def test_validation_chain_crops_to_the_brain_and_inverts_exactly(entries):
    chain = get_val_transforms(roi_size=(32, 32))
    entry = entries[1]
    out = chain(entry)
    brain = raw(entry["image"][0]) > 0
    depth = np.flatnonzero(brain.any(axis=(0, 1)))
    assert out["image"].shape[0] == 4 and out["image"].shape[-1] == depth[-1] - depth[0] + 1
    out["pred"] = out["label"].clone()
    restored = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)(out)["pred"]
    reference = ConvertToMultiChannelBasedOnBratsClasses()(raw(entry["label"]))
    assert restored.shape == (3, 48, 48, 32)
    np.testing.assert_array_equal(restored.numpy().astype(bool), reference)
    np.testing.assert_array_equal(restored.affine.numpy(), nib.load(entry["label"]).affine)


def test_inference_prediction_back_to_a_brats_label_file(entries):
    entry = entries[5]
    chain = get_inference_transforms(roi_size=(32, 32))
    data = chain({"image": entry["image"]})
    regions = get_val_transforms(roi_size=(32, 32))(entry)["label"].as_tensor()  # a perfect "prediction"
    data["pred"] = MetaTensor(regions)  # a network output is a bare tensor: wrap it, Invertd reads the image's trace
    restored = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)(data)["pred"]
    labels = regions_to_brats_labels(restored)
    assert labels.dtype == torch.uint8 and labels.shape == (1, 48, 48, 32)
    np.testing.assert_array_equal(labels[0].numpy(), raw(entry["label"]))
    np.testing.assert_array_equal(labels.affine.numpy(), nib.load(entry["label"]).affine)


@pytest.mark.parametrize("size_multiple, expected_multiple", [(None, 16), (8, 8)])
def test_a_brain_wider_than_the_roi_is_padded_not_cropped(entries, size_multiple, expected_multiple):
    entry = entries[1]
    brain = raw(entry["image"][0]) > 0
    extent = [int(np.ptp(np.flatnonzero(brain.any(axis=axes)))) + 1 for axes in ((1, 2), (0, 2))]
    assert min(extent) > 16  # the roi below is narrower than the brain
    chain = get_val_transforms(roi_size=(16, 32), size_multiple=size_multiple)
    out = chain(entry)
    expected = [max(roi, -(-side // expected_multiple) * expected_multiple) for side, roi in zip(extent, (16, 32))]
    assert list(out["image"].shape[1:3]) == expected
    out["pred"] = out["label"].clone()
    restored = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=True)(out)["pred"]
    np.testing.assert_array_equal(
        restored.numpy().astype(bool), ConvertToMultiChannelBasedOnBratsClasses()(raw(entry["label"]))
    )
    out["brain"] = MetaTensor((out["image"][:1] != 0).float())
    restored_brain = Invertd("brain", transform=chain, orig_keys="image", nearest_interp=True)(out)["brain"]
    np.testing.assert_array_equal(restored_brain[0].numpy().astype(bool), brain)


def test_size_multiple_must_be_positive():
    with pytest.raises(ValueError, match="size_multiple must be >= 1, got 0"):
        get_inference_transforms((32, 32), size_multiple=0)


def test_inference_chain_without_label(entries):
    out = get_inference_transforms(FULL_ROI)({"image": entries[2]["image"]})
    assert set(out) == {"image", "subject_id"} and out["subject_id"] == entries[2]["subject_id"]
    assert out["image"].shape[:3] == (4, 48, 48)
    with_label = get_inference_transforms(FULL_ROI)(entries[2])
    assert with_label["label"].shape == (3, *with_label["image"].shape[1:])


def test_training_slices(entries):
    chain = get_train_transforms(roi_size=(32, 40), num_slices_per_volume=5, augment=True)
    chain.set_random_state(0)
    samples = chain(entries[0])
    assert len(samples) == 5
    for sample in samples:
        assert set(sample) == {"image", "label", "mask", "grade", "subject_id"}
        assert sample["image"].shape == (4, 32, 40) and sample["image"].dtype == torch.float32
        assert sample["label"].shape == (3, 32, 40) and sample["label"].dtype == torch.float32
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0}
        assert torch.equal(sample["mask"], 2 * sample["label"] - 1)
        assert sample["grade"].dtype == torch.long and int(sample["grade"]) == entries[0]["grade"]
        assert sample["subject_id"] == entries[0]["subject_id"]
        # nested regions survive augmentation: ET within TC within WT
        tc, wt, et = sample["label"]
        assert bool((et <= tc).all()) and bool((tc <= wt).all())


def test_training_slices_are_slices_of_the_validation_volume(entries):
    volume = get_val_transforms(FULL_ROI)(entries[3])["image"].as_tensor()
    chain = get_train_transforms(roi_size=FULL_ROI, num_slices_per_volume=6, tumour_fraction=1.0, augment=False)
    chain.set_random_state(1)
    for sample in chain(entries[3]):
        matches = [z for z in range(volume.shape[-1]) if torch.allclose(volume[..., z], sample["image"])]
        assert len(matches) == 1
        assert sample["label"].sum() > 0  # tumour_fraction 1: every slice is centred on a tumour voxel


@pytest.mark.parametrize("roi", [(32, 40), (64, 56)])
def test_padding_in_cache_gives_the_same_slices(entries, roi):
    outputs = []
    for pad_in_cache in (False, True):
        chain = get_train_transforms(roi_size=roi, num_slices_per_volume=4, augment=True, pad_in_cache=pad_in_cache)
        chain.set_random_state(7)
        outputs.append(chain(entries[1]))
    for per_slice, cached in zip(*outputs, strict=True):
        for key in ("image", "label", "mask"):
            assert torch.allclose(per_slice[key], cached[key], atol=1e-5), key


def test_background_slices_hold_brain(entries):
    chain = get_train_transforms(roi_size=FULL_ROI, num_slices_per_volume=6, tumour_fraction=0.0, augment=False)
    chain.set_random_state(2)
    assert all((sample["image"] != 0).sum() > 20 for sample in chain(entries[4]))


def test_factory_argument_checks():
    with pytest.raises(ValueError, match="roi_size"):
        get_train_transforms(roi_size=(192,))
    with pytest.raises(ValueError, match="tumour_fraction"):
        get_train_transforms(tumour_fraction=1.5)
    with pytest.raises(ValueError, match="num_slices_per_volume"):
        get_train_transforms(num_slices_per_volume=0)
