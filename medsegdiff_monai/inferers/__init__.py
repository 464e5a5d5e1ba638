"""inferers of medsegdiff_monai."""
