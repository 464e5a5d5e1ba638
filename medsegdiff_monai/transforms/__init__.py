"""MONAI dictionary transforms and transform chains for BraTS tumour segmentation and grading."""

from medsegdiff_monai.transforms.compose import UntrackedTailCompose, meta_tracking
from medsegdiff_monai.transforms.grade import (
    AttachGraded,
    LoadGradeFromCSVd,
    grade_to_tensor,
    source_path,
    subject_id_from_path,
)
from medsegdiff_monai.transforms.mask import MaskToSymmetricd
from medsegdiff_monai.transforms.pipelines import (
    get_inference_transforms,
    get_train_transforms,
    get_val_transforms,
    volume_transforms,
)
from medsegdiff_monai.transforms.regions import (
    CheckBratsLabelsd,
    RegionsToBratsLabelsd,
    SuppressSmallEnhancingd,
    regions_to_brats_labels,
    suppress_small_enhancing,
)
from medsegdiff_monai.transforms.subject import SubjectIdd

__all__ = [
    "AttachGraded",
    "CheckBratsLabelsd",
    "LoadGradeFromCSVd",
    "MaskToSymmetricd",
    "RegionsToBratsLabelsd",
    "SubjectIdd",
    "SuppressSmallEnhancingd",
    "UntrackedTailCompose",
    "get_inference_transforms",
    "get_train_transforms",
    "get_val_transforms",
    "grade_to_tensor",
    "meta_tracking",
    "regions_to_brats_labels",
    "source_path",
    "subject_id_from_path",
    "suppress_small_enhancing",
    "volume_transforms",
]
