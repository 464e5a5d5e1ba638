"""Old path of :mod:`medsegdiff_monai.workflows.export`, kept for one release."""

from medsegdiff_monai.utils import moved_module

moved_module(__name__, "medsegdiff_monai.workflows.export")
