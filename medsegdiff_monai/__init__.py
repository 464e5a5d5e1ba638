"""MONAI-native MedSegDiff-V2: diffusion segmentation of brain tumours with LGG/HGG grading."""

__version__ = "0.11.0"
