"""Reading, validating and splitting BraTS data, and synthetic BraTS-like data in the real on-disk layout."""

from medsegdiff_monai.data.datalist import (
    build_datalist,
    build_segmentation_datalist,
    load_brats_datalist,
    subject_entry,
    write_datalist,
)
from medsegdiff_monai.data.dataset import make_slice_dataset
from medsegdiff_monai.data.layout import (
    BRATS_LABEL_VALUES,
    ENHANCING_LABEL,
    GRADE_TO_INDEX,
    INDEX_TO_GRADE,
    LABEL_VALUES,
    MODALITIES,
    NAME_MAPPING_COLUMNS,
    NAME_MAPPING_FILENAME,
    RELEASE_TITLES,
    RELEASES,
    BratsSubject,
    convert_label_convention,
    label_convention,
    release_of_file,
)
from medsegdiff_monai.data.name_mapping import NameMapping, parse_name_mapping, read_name_mapping
from medsegdiff_monai.data.nifti_reader import ThreadSafeNibabelReader
from medsegdiff_monai.data.reader import SubjectFiles, list_subject_dirs, locate_subject_files
from medsegdiff_monai.data.split import class_balance_line, grade_class_weights, stratified_split
from medsegdiff_monai.data.synthetic import (
    SYNTHETIC_LAYOUTS,
    SyntheticSubject,
    brats_affine,
    make_synthetic_subject,
    write_synthetic_brats,
)
from medsegdiff_monai.data.validation import (
    BratsDataError,
    FolderReport,
    check_subject_volumes,
    mixed_release_problems,
    read_brats_folder,
    validate_brats_folder,
)

__all__ = [
    "BRATS_LABEL_VALUES",
    "ENHANCING_LABEL",
    "GRADE_TO_INDEX",
    "INDEX_TO_GRADE",
    "LABEL_VALUES",
    "MODALITIES",
    "NAME_MAPPING_COLUMNS",
    "NAME_MAPPING_FILENAME",
    "RELEASES",
    "RELEASE_TITLES",
    "SYNTHETIC_LAYOUTS",
    "BratsDataError",
    "BratsSubject",
    "FolderReport",
    "NameMapping",
    "SubjectFiles",
    "SyntheticSubject",
    "ThreadSafeNibabelReader",
    "brats_affine",
    "build_datalist",
    "build_segmentation_datalist",
    "check_subject_volumes",
    "class_balance_line",
    "convert_label_convention",
    "grade_class_weights",
    "label_convention",
    "list_subject_dirs",
    "make_slice_dataset",
    "load_brats_datalist",
    "locate_subject_files",
    "make_synthetic_subject",
    "mixed_release_problems",
    "parse_name_mapping",
    "read_brats_folder",
    "read_name_mapping",
    "release_of_file",
    "stratified_split",
    "subject_entry",
    "validate_brats_folder",
    "write_datalist",
]
