import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

from medsegdiff_monai.transforms import (
    CheckBratsLabelsd,
    MaskToSymmetricd,
    RegionsToBratsLabelsd,
    SuppressSmallEnhancingd,
    regions_to_brats_labels,
    suppress_small_enhancing,
)


def random_labels(shape=(6, 5, 4), seed=0):
    return np.random.default_rng(seed).choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape)


def test_inverse_of_monai_regions_numpy_and_torch():
    labels = random_labels()
    regions = ConvertToMultiChannelBasedOnBratsClasses()(labels)
    np.testing.assert_array_equal(regions_to_brats_labels(regions), labels[None])
    back = regions_to_brats_labels(torch.as_tensor(regions).float())
    assert back.dtype == torch.uint8
    np.testing.assert_array_equal(back.numpy(), labels[None])


def test_hand_made_regions():
    # voxel by voxel: TC, WT, ET -> label; ET wins, then TC, then WT
    regions = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    assert regions_to_brats_labels(regions).tolist() == [[4, 1, 2, 0, 4]]
    probabilities = torch.tensor([[0.6], [0.9], [0.4]])
    assert regions_to_brats_labels(probabilities).tolist() == [[1]]
    assert regions_to_brats_labels(probabilities, threshold=0.3).tolist() == [[4]]


def test_dict_inverse_keeps_metadata():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    regions = MetaTensor(torch.zeros(3, 4, 4, 2), affine=affine)
    regions[:2, 1, 1, 1] = 1
    out = RegionsToBratsLabelsd("pred")({"pred": regions})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    assert out.shape == (1, 4, 4, 2) and out[0, 1, 1, 1] == 1 and out.sum() == 1


def test_inverse_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"shape \(3, \*spatial\)"):
        regions_to_brats_labels(torch.zeros(2, 4, 4))


def test_label_check():
    good = MetaTensor(torch.tensor([[0.0, 1.0, 2.0, 4.0]]), meta={"filename_or_obj": "/d/s_seg.nii"})
    assert CheckBratsLabelsd()({"label": good})["label"] is good
    bad = MetaTensor(torch.tensor([[0.0, 3.0, 5.0]]), meta={"filename_or_obj": "/d/s_seg.nii"})
    with pytest.raises(ValueError, match=r"subject s1: label file /d/s_seg.nii holds labels \[0, 3, 5\]: values \[5\]"):
        CheckBratsLabelsd()({"label": bad, "subject_id": "s1"})
    mixed = MetaTensor(torch.tensor([[0.0, 3.0, 4.0]]), meta={"filename_or_obj": "/d/m-seg.nii.gz"})
    with pytest.raises(ValueError, match=r"/d/m-seg.nii.gz holds labels \[0, 3, 4\]: it mixes labels 3 and 4"):
        CheckBratsLabelsd()({"label": mixed})
    interpolated = MetaTensor(torch.tensor([[0.0, 1.4, 2.0]]), meta={"filename_or_obj": "/d/i_seg.nii"})
    with pytest.raises(ValueError, match=r"i_seg.nii holds labels \[0, 1.4, 2\]: values \[1.4\] are outside both"):
        CheckBratsLabelsd()({"label": interpolated})


def test_brats2023_labels_give_the_same_regions_as_brats2020():
    labels_2020 = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    labels_2023 = MetaTensor(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), meta={"filename_or_obj": "x-seg.nii.gz"})
    internal = CheckBratsLabelsd()({"label": labels_2023})["label"]
    assert isinstance(internal, MetaTensor) and internal.meta["filename_or_obj"] == "x-seg.nii.gz"
    assert labels_2023.tolist() == [[[0.0, 1.0], [2.0, 3.0]]]  # input untouched
    regions = ConvertToMultiChannelBasedOnBratsClasses()
    # hand-checked: TC = {1, ET}, WT = {1, 2, ET}, ET = {ET} on voxels (0, 1, 2, ET)
    assert (
        regions(internal).tolist()
        == regions(labels_2020).tolist()
        == [
            [[[False, True], [False, True]]],
            [[[False, True], [True, True]]],
            [[[False, False], [False, True]]],
        ]
    )


def test_mask_to_symmetric():
    label = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    out = MaskToSymmetricd("label")({"label": label})
    assert out["mask"].dtype == torch.float32 and out["mask"].tolist() == [[[-1.0, 1.0], [1.0, -1.0]]]
    assert out["label"] is label
    two = MaskToSymmetricd(["a", "b"], mask_keys=["ma", "mb"])({"a": np.ones(2), "b": np.zeros(2)})
    assert two["ma"].tolist() == [1.0, 1.0] and two["mb"].tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match=r"got mask_keys \['mask', 'mask'\]: give one distinct mask key per key"):
        MaskToSymmetricd(["a", "b"])  # both would write "mask", the second over the first


def test_small_enhancing_tumour_becomes_core():
    labels = np.array([[0, 4, 4], [1, 2, 0]], dtype=np.uint8)  # 2 ET voxels
    below = suppress_small_enhancing(labels, min_voxels=3)
    assert isinstance(below, np.ndarray) and below.dtype == np.uint8
    np.testing.assert_array_equal(below, [[0, 1, 1], [1, 2, 0]])
    np.testing.assert_array_equal(labels, [[0, 4, 4], [1, 2, 0]])  # input untouched
    for kept in (0, 1, 2):  # 2 voxels are kept from a threshold of 2 down; 0 keeps everything
        np.testing.assert_array_equal(suppress_small_enhancing(labels, kept), labels)
    # TC = {1, 4} and WT = {1, 2, 4} do not change, ET empties
    regions, regions_after = (ConvertToMultiChannelBasedOnBratsClasses()(x) for x in (labels, below))
    np.testing.assert_array_equal(regions[:2], regions_after[:2])
    assert regions[2].sum() == 2 and regions_after[2].sum() == 0
    tensor = suppress_small_enhancing(torch.as_tensor(labels), 3)
    assert isinstance(tensor, torch.Tensor) and tensor.tolist() == below.tolist()


def test_dict_suppression_keeps_metadata_and_rejects_negative_threshold():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    labels = MetaTensor(torch.tensor([[[[4, 0], [2, 1]]]], dtype=torch.uint8), affine=affine)
    out = SuppressSmallEnhancingd("pred", min_voxels=5)({"pred": labels})["pred"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine)
    assert out.flatten().tolist() == [1, 0, 2, 1]
    with pytest.raises(ValueError, match="min_voxels must be >= 0"):
        SuppressSmallEnhancingd("pred", min_voxels=-1)
    with pytest.raises(ValueError, match="min_voxels must be >= 0"):
        suppress_small_enhancing(labels, -1)
