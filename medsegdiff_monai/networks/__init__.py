"""networks of medsegdiff_monai."""
