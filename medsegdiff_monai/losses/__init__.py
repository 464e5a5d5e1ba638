"""losses of medsegdiff_monai."""
