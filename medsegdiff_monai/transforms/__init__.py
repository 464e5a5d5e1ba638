"""transforms of medsegdiff_monai."""
