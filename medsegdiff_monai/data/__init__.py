"""Reading, validating and splitting BraTS data, and synthetic BraTS-like data in the real on-disk layout."""

from medsegdiff_monai.data.datalist import build_datalist, load_brats_datalist, subject_entry, write_datalist
from medsegdiff_monai.data.dataset import make_slice_dataset
from medsegdiff_monai.data.layout import (
    BRATS_LABEL_VALUES,
    GRADE_TO_INDEX,
    INDEX_TO_GRADE,
    MODALITIES,
    NAME_MAPPING_COLUMNS,
    NAME_MAPPING_FILENAME,
    BratsSubject,
)
from medsegdiff_monai.data.name_mapping import NameMapping, parse_name_mapping, read_name_mapping
from medsegdiff_monai.data.nifti_reader import ThreadSafeNibabelReader
from medsegdiff_monai.data.preflight import check_training_inputs, exit_on_bad_input, read_datalist_json
from medsegdiff_monai.data.reader import SubjectFiles, list_subject_dirs, locate_subject_files
from medsegdiff_monai.data.split import class_balance_line, grade_class_weights, stratified_split
from medsegdiff_monai.data.synthetic import (
    SyntheticSubject,
    brats_affine,
    make_synthetic_subject,
    write_synthetic_brats,
)
from medsegdiff_monai.data.validation import (
    BratsDataError,
    FolderReport,
    check_subject_volumes,
    read_brats_folder,
    validate_brats_folder,
)

__all__ = [
    "BRATS_LABEL_VALUES",
    "GRADE_TO_INDEX",
    "INDEX_TO_GRADE",
    "MODALITIES",
    "NAME_MAPPING_COLUMNS",
    "NAME_MAPPING_FILENAME",
    "BratsDataError",
    "BratsSubject",
    "FolderReport",
    "NameMapping",
    "SubjectFiles",
    "SyntheticSubject",
    "ThreadSafeNibabelReader",
    "brats_affine",
    "build_datalist",
    "check_subject_volumes",
    "check_training_inputs",
    "class_balance_line",
    "exit_on_bad_input",
    "grade_class_weights",
    "list_subject_dirs",
    "make_slice_dataset",
    "load_brats_datalist",
    "locate_subject_files",
    "make_synthetic_subject",
    "parse_name_mapping",
    "read_brats_folder",
    "read_datalist_json",
    "read_name_mapping",
    "stratified_split",
    "subject_entry",
    "validate_brats_folder",
    "write_datalist",
]
