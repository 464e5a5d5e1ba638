"""Session-wide fixtures: a tiny synthetic BraTS folder in the real on-disk layout, and its datalist."""

import shutil
from pathlib import Path

import pytest

from medsegdiff_monai.data import build_datalist, read_brats_folder, write_datalist, write_synthetic_brats

SYNTHETIC_SHAPE = (48, 48, 32)
SYNTHETIC_SUBJECTS = 8


@pytest.fixture(scope="session")
def synthetic_brats_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 synthetic subjects of shape (48, 48, 32), LGG fraction 0.4 (3 LGG, 5 HGG), seed 0. Do not modify it:
    copy it (``shutil.copytree``) first."""
    out = tmp_path_factory.mktemp("synthetic_brats")
    return write_synthetic_brats(
        out, num_subjects=SYNTHETIC_SUBJECTS, lgg_fraction=0.4, shape=SYNTHETIC_SHAPE, seed=0, progress=False
    )


@pytest.fixture(scope="session")
def synthetic_datalist(synthetic_brats_dir: Path) -> Path:
    """Path of ``datalist.json`` (in the data folder) for :func:`synthetic_brats_dir`: val_fraction 0.25, seed 0,
    i.e. 6 training subjects (2 LGG, 4 HGG) and 2 validation subjects (1 LGG, 1 HGG)."""
    subjects = read_brats_folder(synthetic_brats_dir, progress=False)
    datalist = build_datalist(subjects, synthetic_brats_dir, val_fraction=0.25, seed=0)
    return write_datalist(datalist, synthetic_brats_dir / "datalist.json")


@pytest.fixture
def brats_copy(tmp_path: Path, synthetic_brats_dir: Path) -> Path:
    """A private, modifiable copy of :func:`synthetic_brats_dir` (without its datalist)."""
    copy = tmp_path / "brats"
    shutil.copytree(synthetic_brats_dir, copy, ignore=shutil.ignore_patterns("datalist.json"))
    return copy
