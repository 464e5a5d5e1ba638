"""Old path of :mod:`medsegdiff_monai.networks.diffusion_unet_grade`, kept for one release."""

from medsegdiff_monai.utils import moved_module

moved_module(__name__, "medsegdiff_monai.networks.diffusion_unet_grade")
