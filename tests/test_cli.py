import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsegdiff_monai import cli

SHAPE = ["24", "24", "16"]


def synth(out, subjects=6, lgg_fraction="0.34", seed="1"):
    args = ["synth", "--out", str(out), "--subjects", str(subjects), "--lgg-fraction", lgg_fraction]
    return cli.main([*args, "--shape", *SHAPE, "--seed", seed, "--no-progress"])


def test_synth_then_datalist(tmp_path, capsys):
    data = tmp_path / "brats"
    assert synth(data) == 0
    out = tmp_path / "lists" / "datalist.json"
    code = cli.main(["datalist", "--data-dir", str(data), "--val-fraction", "0.34", "--out", str(out), "--no-progress"])
    assert code == 0
    # 6 subjects, round(6 * 0.34) = 2 LGG; validation takes round(0.68) = 1 LGG and round(1.36) = 1 HGG
    assert "n_LGG=1 n_HGG=3 alpha_LGG=2.000 alpha_HGG=0.667" in capsys.readouterr().out
    datalist = json.loads(out.read_text())
    assert len(datalist["training"]) == 4 and len(datalist["validation"]) == 2
    assert all((data / e["label"]).is_file() and not e["label"].startswith("/") for e in datalist["training"])


def test_datalist_default_output_next_to_the_data(tmp_path):
    assert synth(tmp_path, subjects=4, lgg_fraction="0.5") == 0
    assert cli.main(["datalist", "--data-dir", str(tmp_path), "--val-fraction", "0.0", "--no-progress"]) == 0
    assert len(json.loads((tmp_path / "datalist.json").read_text())["training"]) == 4


def test_datalist_with_a_test_split(tmp_path, capsys):
    data = tmp_path / "brats"
    assert synth(data, subjects=8, lgg_fraction="0.5") == 0
    out = tmp_path / "datalist.json"
    args = ["datalist", "--data-dir", str(data), "--val-fraction", "0.25", "--test-fraction", "0.25"]
    assert cli.main([*args, "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "training 4 (n_LGG=2 n_HGG=2), validation 2 (n_LGG=1 n_HGG=1), testing 2 (n_LGG=1 n_HGG=1)" in printed
    assert len(json.loads(out.read_text())["testing"]) == 2
    out.unlink()
    too_many = ["--val-fraction", "0.25", "--test-fraction", "0.1", "--out", str(out), "--no-progress"]
    assert cli.main(["datalist", "--data-dir", str(data), *too_many]) == 1
    refusal = capsys.readouterr().err
    assert "--test-fraction 0.1 of 4 LGG and 4 HGG subjects gives 0 testing LGG subjects" in refusal
    assert "pass --test-fraction from 0.13 to 0.62, or 0 for no testing list" in refusal
    assert not out.exists()


def test_synth_is_deterministic(tmp_path):
    for name in ("a", "b"):
        assert synth(tmp_path / name, subjects=2) == 0
    digest = {n: hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / n).rglob("*.*")))).hexdigest()
              for n in ("a", "b")}  # fmt: skip
    assert digest["a"] == digest["b"]


def test_check_lists_every_problem(tmp_path, capsys):
    assert synth(tmp_path, subjects=4, lgg_fraction="0.5") == 0
    assert cli.main(["check", "--data-dir", str(tmp_path), "--no-progress"]) == 0
    assert "4 subjects, no problem found" in capsys.readouterr().out
    (tmp_path / "BraTS20_Training_001" / "BraTS20_Training_001_t2.nii").unlink()
    (tmp_path / "BraTS20_Training_003" / "BraTS20_Training_003_seg.nii").write_bytes(b"broken")
    (tmp_path / "BraTS20_Training_005").mkdir()
    assert cli.main(["check", "--data-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "subject BraTS20_Training_001: missing modality 't2'" in err
    assert "subject BraTS20_Training_003: file" in err and "_seg.nii is not a readable NIfTI" in err
    assert "subject BraTS20_Training_005: folder" in err and "has no row in" in err
    assert "subject BraTS20_Training_005: missing modality 't1'" in err
    assert "8 problem(s) found" in err  # 001: 1, 003: 1, 005: no CSV row, four modalities and a label


def test_datalist_writes_nothing_on_failure(tmp_path, capsys):
    assert synth(tmp_path, subjects=4, lgg_fraction="0.5") == 0
    (tmp_path / "BraTS20_Training_002" / "BraTS20_Training_002_flair.nii").unlink()
    out = tmp_path / "datalist.json"
    assert cli.main(["datalist", "--data-dir", str(tmp_path), "--out", str(out), "--no-progress"]) == 1
    assert "nothing written" in capsys.readouterr().err and not out.exists()


def test_datalist_refuses_a_split_without_a_training_class(tmp_path, capsys):
    assert synth(tmp_path, subjects=3, lgg_fraction="0.34") == 0  # 1 LGG subject
    out = tmp_path / "datalist.json"
    args = ["datalist", "--data-dir", str(tmp_path), "--val-fraction", "0.6", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 1
    assert "no LGG subject" in capsys.readouterr().err and not out.exists()


def test_an_operating_system_error_is_one_line(tmp_path, capsys):
    """A path that the operating system refuses (a file where a folder is needed) or a folder where the datalist
    file goes ends the command with exit code 1 and one line naming the path, before any work."""
    (tmp_path / "a_file").write_text("")
    assert synth(tmp_path / "a_file" / "brats") == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'a_file' / 'brats'}: not a directory\n"
    assert synth(tmp_path / "brats") == 0
    capsys.readouterr()
    code = cli.main(["datalist", "--data-dir", str(tmp_path / "brats"), "--out", str(tmp_path), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "subjects valid" not in captured.out  # refused before the folder is validated
    expected = f"error: --out {tmp_path} is a folder: give the JSON file to write, e.g. {tmp_path / 'datalist.json'}."
    assert captured.err.strip() == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_datalist_rewrites_the_same_split_but_keeps_another(tmp_path, capsys):
    """Running the same datalist command again writes the same file (the README's command can be repeated); a
    different split over it (another seed) would move held-out subjects, and needs --overwrite."""
    assert synth(tmp_path / "brats") == 0
    command = ["datalist", "--data-dir", str(tmp_path / "brats"), "--val-fraction", "0.34", "--no-progress"]
    out = tmp_path / "brats" / "datalist.json"
    assert cli.main(command) == 0 and cli.main(command) == 0
    first = out.read_text()
    capsys.readouterr()
    assert cli.main([*command, "--seed", "3"]) == 1
    assert f"{out} already holds another datalist" in capsys.readouterr().err
    assert out.read_text() == first
    assert cli.main([*command, "--seed", "3", "--overwrite"]) == 0 and out.read_text() != first


def test_usage(capsys):
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["synth", "--out", "x", "--lgg-fraction", "2"])
    assert exit_info.value.code == 2


def test_commands_are_extensible(monkeypatch):
    def register_hello(subparsers):
        subparsers.add_parser("hello").set_defaults(handler=lambda args: 7)

    monkeypatch.setattr(cli, "COMMANDS", [*cli.COMMANDS, register_hello])
    assert cli.main(["hello"]) == 7


def test_module_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "medsegdiff_monai", "check", "--data-dir", str(tmp_path / "missing"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "does not exist" in result.stderr


def _label_map_bytes(enhancing: int, tmp_path) -> bytes:
    """A small label map with necrosis, oedema and the enhancing label ``enhancing``, as NIfTI bytes."""
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, :3] = [1, 2, enhancing]
    path = tmp_path / f"labels_{enhancing}.nii.gz"
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(path))
    return path.read_bytes()


def test_submission_names_each_segmentation_by_its_subject(tmp_path, capsys):
    predictions = tmp_path / "inference"
    predictions.mkdir()
    contents = {"BraTS2021_00001": _label_map_bytes(4, tmp_path), "BraTS-GLI-00002-000": _label_map_bytes(3, tmp_path)}
    for subject_id, content in contents.items():
        (predictions / f"{subject_id}_seg.nii.gz").write_bytes(content)
        (predictions / f"{subject_id}_uncertainty.nii.gz").write_bytes(b"not submitted")
    (predictions / "grades.csv").write_text("subject_id,p_hgg,grade\n")
    out = tmp_path / "submission"
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {f"{s}.nii.gz": c for s, c in contents.items()}
    assert "wrote 2 segmentation(s)" in capsys.readouterr().out
    # the same command again is accepted; a differing file of the same name is kept unless --overwrite
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out)]) == 0
    sampled_again = _label_map_bytes(2, tmp_path)
    (predictions / "BraTS2021_00001_seg.nii.gz").write_bytes(sampled_again)
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out)]) == 1
    assert "BraTS2021_00001.nii.gz already exist(s) with other contents" in capsys.readouterr().err
    assert (out / "BraTS2021_00001.nii.gz").read_bytes() == contents["BraTS2021_00001"]
    (out / "BraTS20_Validation_001.nii.gz").write_bytes(b"of an earlier submission")
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out), "--overwrite"]) == 0
    assert (out / "BraTS2021_00001.nii.gz").read_bytes() == sampled_again
    assert "also holds 1 other .nii.gz file(s) (e.g. BraTS20_Validation_001.nii.gz)" in capsys.readouterr().out
    # no segmentation, or the predictions folder itself as --out
    assert cli.main(["submission", "--predictions", str(out), "--out", str(tmp_path / "x")]) == 1
    assert "holds no <subject_id>_seg.nii.gz" in capsys.readouterr().err
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(predictions)]) == 1
    assert "is the predictions folder itself" in capsys.readouterr().err
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(predictions / "grades.csv")]) == 1
    assert "grades.csv is a file, not a folder: choose another --out" in capsys.readouterr().err


def test_submission_with_the_qu_brats_uncertainty_maps(tmp_path, capsys):
    predictions = tmp_path / "inference"
    predictions.mkdir()
    maps = ("whole", "core", "enhance")
    for subject_id in ("BraTS2020_001", "BraTS2020_002"):
        (predictions / f"{subject_id}_seg.nii.gz").write_bytes(subject_id.encode())
        for region in maps:
            (predictions / f"{subject_id}_unc_{region}.nii.gz").write_bytes(f"{subject_id} {region}".encode())
    out = tmp_path / "submission"
    args = ["submission", "--predictions", str(predictions), "--out", str(out), "--uncertainty"]
    assert cli.main(args) == 0
    expected = {f"{s}.nii.gz": s for s in ("BraTS2020_001", "BraTS2020_002")}
    expected |= {f"{s}_unc_{r}.nii.gz": f"{s} {r}" for s in ("BraTS2020_001", "BraTS2020_002") for r in maps}
    assert {p.name: p.read_text() for p in out.iterdir()} == expected
    assert "wrote 2 segmentation(s)" in capsys.readouterr().out
    # a subject without its maps: named, and nothing is written
    (predictions / "BraTS2020_002_unc_core.nii.gz").unlink()
    assert cli.main([*args[:-2], str(tmp_path / "second"), "--uncertainty"]) == 1
    error = capsys.readouterr().err
    assert "BraTS2020_002_unc_core.nii.gz" in error and "--write_region_uncertainty true" in error
    assert not (tmp_path / "second").exists()


def test_submission_refuses_labels_in_the_other_release_of_the_subject_id(tmp_path, capsys):
    """A BraTS 2023 subject written with ET = 4 (inference run with --label_convention brats2020) would lose its
    enhancing tumour on the portal; it is named and nothing is written. Ids of no known release are not checked."""
    predictions = tmp_path / "inference"
    predictions.mkdir()
    (predictions / "BraTS-GLI-00002-000_seg.nii.gz").write_bytes(_label_map_bytes(4, tmp_path))
    (predictions / "BraTS2021_00001_seg.nii.gz").write_bytes(_label_map_bytes(4, tmp_path))
    (predictions / "case07_seg.nii.gz").write_bytes(_label_map_bytes(3, tmp_path))
    out = tmp_path / "submission"
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "BraTS-GLI-00002-000_seg.nii.gz holds ET = 4 (BraTS 2018-2022 labels)" in error
    assert "subject, whose challenge reads ET = 3: run inference again with --label_convention brats2023" in error
    assert "BraTS2021_00001" not in error and "case07" not in error and not out.exists()
    (predictions / "BraTS-GLI-00002-000_seg.nii.gz").write_bytes(_label_map_bytes(3, tmp_path))
    assert cli.main(["submission", "--predictions", str(predictions), "--out", str(out)]) == 0


def test_version_is_the_package_version_the_bundle_requires(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    metadata = json.loads((Path(__file__).parents[1] / "bundle/configs/metadata.json").read_text())
    required = metadata["required_packages_version"]["medsegdiff_monai"]
    assert capsys.readouterr().out.strip() == f"medsegdiff-monai {required}"


def test_the_cli_module_runs_as_a_script(tmp_path):
    """``python -m medsegdiff_monai.cli`` runs the command line, as ``python -m medsegdiff_monai`` does."""
    result = subprocess.run(
        [sys.executable, "-m", "medsegdiff_monai.cli", "synth", "--out", str(tmp_path / "d"), "--subjects", "1",
         "--shape", "16", "16", "16", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "d").glob("*/*_t1.nii*"))) == 1
