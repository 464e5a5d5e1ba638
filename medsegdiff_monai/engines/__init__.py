"""engines of medsegdiff_monai."""
