"""Workflows around the inferers: input resolution, whole-subject inference with file outputs, evaluation, export."""

from medsegdiff_monai.workflows.evaluation import (
    evaluation_list,
    evaluation_provenance,
    is_in_sample,
    run_evaluation,
)
from medsegdiff_monai.workflows.export import (
    ExportedDiffusionNetwork,
    export_from_checkpoint,
    export_network,
    exported_program_paths,
    load_exported_network,
)
from medsegdiff_monai.workflows.inputs import check_inference_inputs, collect_inference_inputs, resolve_entries
from medsegdiff_monai.workflows.large_files import check_large_files, refresh_large_files
from medsegdiff_monai.workflows.pipeline import (
    BratsVolumeInferer,
    SubjectOutput,
    SubjectPrediction,
    check_inference_run,
    check_no_earlier_outputs,
    check_output_folder,
)
from medsegdiff_monai.workflows.submission import write_submission
from medsegdiff_monai.workflows.writers import write_grades_csv, write_nifti_like

__all__ = [
    "BratsVolumeInferer",
    "ExportedDiffusionNetwork",
    "SubjectOutput",
    "SubjectPrediction",
    "check_inference_inputs",
    "check_inference_run",
    "check_large_files",
    "check_no_earlier_outputs",
    "check_output_folder",
    "collect_inference_inputs",
    "evaluation_list",
    "evaluation_provenance",
    "export_from_checkpoint",
    "export_network",
    "exported_program_paths",
    "is_in_sample",
    "load_exported_network",
    "refresh_large_files",
    "resolve_entries",
    "run_evaluation",
    "write_grades_csv",
    "write_nifti_like",
    "write_submission",
]
