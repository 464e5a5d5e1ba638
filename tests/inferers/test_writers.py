from __future__ import annotations

import struct
import zlib

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai.visualize import label_overlay, tumour_slice, write_png
from medsegdiff_monai.workflows import write_grades_csv, write_nifti_like


def _decode_png(data: bytes) -> np.ndarray:
    """Minimal independent decoder for 8-bit RGB PNGs without filtering (filter type 0 on every row)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, size = 8, b"", None
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:10] == bytes([8, 2])  # 8 bits, RGB
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height = size
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(write_png(rgb, tmp_path / "a.png").read_bytes()), rgb)
    with pytest.raises(ValueError, match="H, W, 3"):
        write_png(rgb[..., 0], tmp_path / "b.png")


def test_overlay_colours_labels_and_picks_the_largest_tumour_slice():
    labels = np.zeros((6, 6, 4), dtype=np.uint8)
    labels[1:3, 1:3, 1] = 4
    labels[0:4, 0:4, 2] = 2
    assert tumour_slice(labels) == 2
    assert tumour_slice(np.zeros((3, 3, 5))) == 2
    rgb = label_overlay(np.zeros((6, 6)), labels[..., 2], alpha=1.0)
    oedema = np.rot90(labels[..., 2] == 2)
    assert (rgb[oedema] == (40, 200, 60)).all() and (rgb[~oedema] == 0).all()


def test_nifti_keeps_reference_grid_and_dtype(tmp_path):
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = (10, 20, -5)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.int16), affine), str(tmp_path / "ref.nii"))
    labels = np.zeros((4, 5, 6), dtype=np.uint8)
    labels[1, 2, 3] = 4
    written = nib.load(str(write_nifti_like(labels, tmp_path / "ref.nii", tmp_path / "seg.nii.gz")))
    np.testing.assert_allclose(written.affine, affine)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    with pytest.raises(ValueError, match="differs from the input"):
        write_nifti_like(labels[:3], tmp_path / "ref.nii", tmp_path / "bad.nii.gz")


def test_nifti_keeps_a_differing_qform_and_sform_and_drops_the_intensity_window(tmp_path):
    sform = np.diag([-1.0, -1.0, 1.0, 1.0])
    sform[:3, 3] = (0, 63, 0)
    qform = sform.copy()
    qform[0, 3] = 10.0  # a reference whose two transforms differ by 10 mm
    reference = nib.Nifti1Image(np.zeros((4, 5, 6), dtype=np.int16), sform)
    reference.set_qform(qform, code=1)
    reference.set_sform(sform, code=2)
    reference.header["cal_min"], reference.header["cal_max"], reference.header["descrip"] = 0, 1500, b"T1 MPRAGE"
    reference.header.set_intent("estimate")
    nib.save(reference, str(tmp_path / "ref.nii"))
    written = nib.load(
        str(write_nifti_like(np.zeros((4, 5, 6), np.uint8), tmp_path / "ref.nii", tmp_path / "o.nii.gz"))
    )
    loaded = nib.load(str(tmp_path / "ref.nii"))  # the reference as nibabel reads it back
    np.testing.assert_allclose(written.get_qform(), loaded.get_qform())
    np.testing.assert_allclose(written.get_sform(), loaded.get_sform())
    assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
    assert float(written.header["cal_max"]) == 0.0 and written.header["descrip"].item() == b""
    assert written.header.get_intent()[0] == "none"


def test_grades_csv(tmp_path):
    path = write_grades_csv([("a", 0.25), ("b", 0.5), ("c", float("nan"))], tmp_path / "grades.csv")
    assert path.read_text().splitlines() == ["subject_id,p_hgg,grade", "a,0.250000,LGG", "b,0.500000,HGG", "c,nan,"]
    # a value that six decimals would round across the threshold is written in full, beside its grade
    path = write_grades_csv([("d", 0.4999996), ("e", 0.4999994)], tmp_path / "close.csv")
    assert path.read_text().splitlines()[1:] == ["d,0.4999996,LGG", "e,0.499999,LGG"]


def test_grades_csv_update_replaces_rows_by_subject(tmp_path):
    earlier = write_grades_csv([("a", 0.25), ("b", 0.5)], tmp_path / "earlier.csv")
    path = write_grades_csv([("b", 0.1), ("c", 0.9)], tmp_path / "grades.csv", update=earlier)
    assert path.read_text().splitlines() == [
        "subject_id,p_hgg,grade", "a,0.250000,LGG", "b,0.100000,LGG", "c,0.900000,HGG"
    ]  # fmt: skip
