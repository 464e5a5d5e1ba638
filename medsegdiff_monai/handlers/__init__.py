"""handlers of medsegdiff_monai."""
