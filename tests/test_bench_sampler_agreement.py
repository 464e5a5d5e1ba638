"""``benchmarks/bench_sampler_agreement.py`` pairs a stored reference only with runs of the checkpoint it sampled."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def agreement():
    return load_benchmark("bench_sampler_agreement")


def _args(agreement, monkeypatch, *argv: str):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench_sampler_agreement.py", *argv])
    return agreement.parse_args()


def _stored(digest: str | None, subjects: dict[str, float]) -> dict:
    result = {
        "num_subjects": len(subjects),
        **{f"dice_{region}": {"mean": sum(subjects.values()) / len(subjects)} for region in ("TC", "WT", "ET", "mean")},
        "per_subject_dice": {region: subjects for region in ("TC", "WT", "ET", "mean")},
        "seconds": 1.0,
    }
    return result if digest is None else {**result, "checkpoint_sha256": digest}


def test_checkpoint_digest_is_that_of_the_configured_file(agreement, monkeypatch, tmp_path):
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights a")
    second.write_bytes(b"weights b")
    for path in (first, second):
        args = _args(agreement, monkeypatch, "--overrides", json.dumps({"checkpoint": str(path)}))
        assert agreement.checkpoint_sha256(args) == hashlib.sha256(path.read_bytes()).hexdigest()
    shipped = _args(agreement, monkeypatch)  # the bundle's own models/model.pt
    expected = hashlib.sha256((ROOT / "bundle" / "models" / "model.pt").read_bytes()).hexdigest()
    assert agreement.checkpoint_sha256(shipped) == expected


def test_a_reference_of_another_checkpoint_is_refused(agreement, capsys):
    stored = {"ddpm:1000:0:0": _stored("a" * 64, {"s1": 0.8})}
    agreement.check_stored_checkpoints(stored, ["dpmpp_2m:8", "ddpm:1000:0:0"], "a" * 64)  # same checkpoint
    with pytest.raises(ValueError, match=r"ddpm:1000:0:0 .*aaaaaaaaaaaa.*bbbbbbbbbbbb.*two networks"):
        agreement.check_stored_checkpoints(stored, ["ddpm:1000:0:0"], "b" * 64)
    agreement.check_stored_checkpoints({"ddpm:1000:0:0": _stored(None, {"s1": 0.8})}, ["ddpm:1000:0:0"], "b" * 64)
    assert "ddpm:1000:0:0 (--reference) stores no checkpoint digest" in capsys.readouterr().out


def test_merging_keeps_one_checkpoint(agreement, tmp_path):
    paths = []
    for index, (digest, subjects) in enumerate(
        [("a" * 64, {"s1": 0.8}), ("a" * 64, {"s2": 0.6}), ("c" * 64, {"s3": 0.5})]
    ):
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps({"ddpm:1000:0:0": _stored(digest, subjects)}))
    merged = agreement.merge_stored([str(paths[0]), str(paths[1])])["ddpm:1000:0:0"]
    assert merged["checkpoint_sha256"] == "a" * 64 and merged["num_subjects"] == 2
    assert merged["dice_TC"]["mean"] == pytest.approx(0.7)  # (0.8 + 0.6) / 2
    with pytest.raises(ValueError, match="two checkpoints"):
        agreement.merge_stored([str(path) for path in paths])


def _write_runs(tmp_path, runs: list[tuple[dict[str, float], float]]) -> list[str]:
    paths = []
    for index, (subjects, seconds) in enumerate(runs):
        paths.append(str(tmp_path / f"run{index}.json"))
        Path(paths[-1]).write_text(json.dumps({"ddpm:1000:0:0": {**_stored("a" * 64, subjects), "seconds": seconds}}))
    return paths


def test_merging_counts_a_copied_run_once(agreement, tmp_path):
    # two disjoint runs (10 s and 20 s), then a later run's file carrying their merged copy (30 s)
    first, second, copy = _write_runs(
        tmp_path, [({"s1": 0.8}, 10.0), ({"s2": 0.6}, 20.0), ({"s1": 0.8, "s2": 0.6}, 30.0)]
    )
    for order in ([first, second, copy], [copy, first, second], [first, copy, second]):
        merged = agreement.merge_stored(order)["ddpm:1000:0:0"]
        assert merged["num_subjects"] == 2 and merged["seconds"] == 30.0
        assert merged["dice_mean"]["mean"] == pytest.approx(0.7)


def test_merging_refuses_two_runs_that_disagree_or_overlap_in_part(agreement, tmp_path):
    first, other_run = _write_runs(tmp_path, [({"s1": 0.8}, 10.0), ({"s1": 0.7}, 10.0)])
    with pytest.raises(ValueError, match="stores TC Dice 0.7000 for s1, another file 0.8000"):
        agreement.merge_stored([first, other_run])
    first, partial = _write_runs(tmp_path, [({"s1": 0.8, "s2": 0.6}, 10.0), ({"s2": 0.6, "s3": 0.5}, 10.0)])
    with pytest.raises(ValueError, match="covers 1 subjects merged from another file and 1 new ones"):
        agreement.merge_stored([first, partial])


def test_the_run_stops_before_sampling_against_another_checkpoint(agreement, monkeypatch, tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"ddpm:1000:0:0": _stored("0" * 64, {"s1": 0.8})}))
    args = ["--samplers", "dpmpp_2m:8:0:0", "ddpm:1000:0:0", "--reference", str(reference), "--out", str(tmp_path)]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["bench_sampler_agreement.py", *args])
    monkeypatch.setattr(agreement, "evaluate", lambda *_: pytest.fail("sampled before checking the reference"))
    with pytest.raises(ValueError, match="two networks"):
        agreement.main()
    assert not (tmp_path / "agreement.json").exists()


def test_summary_difference_uses_the_subjects_both_evaluated(agreement):
    """A run of 2 subjects against a reference of 3: the difference of the two subjects, not of the two means."""
    run = _stored(None, {"s1": 0.9, "s2": 0.5})
    reference = _stored(None, {"s1": 0.8, "s2": 0.6, "s3": 0.1})
    assert agreement.mean_dice_difference(run, reference, "TC") == pytest.approx(((0.9 - 0.8) + (0.5 - 0.6)) / 2)
    del run["per_subject_dice"]  # an older stored run: only its means
    assert agreement.mean_dice_difference(run, reference, "TC") == pytest.approx(0.7 - 0.5)


def test_parts_split_the_subjects_once_each(agreement, monkeypatch, tmp_path):
    entries = [
        {"image": [f"s{index}/t1.nii"], "label": f"s{index}/seg.nii", "subject_id": f"s{index}"} for index in range(5)
    ]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries, "validation": entries[:1]}))
    overrides = json.dumps({"dataset_dir": str(tmp_path), "datalist_key": "training"})
    chosen = []
    for part in ("1/2", "2/2"):
        args = _args(agreement, monkeypatch, "--part", part, "--out", str(tmp_path), "--overrides", overrides)
        written = json.loads(agreement.write_part_datalist(args).read_text())
        chosen.append([entry["subject_id"] for entry in written["training"]])
    assert chosen == [["s0", "s2", "s4"], ["s1", "s3"]]  # every other subject, each in one part
    args = _args(agreement, monkeypatch, "--part", "6/6", "--out", str(tmp_path), "--overrides", overrides)
    with pytest.raises(ValueError, match="has 5 subjects, none for it"):
        agreement.write_part_datalist(args)


@pytest.mark.parametrize("part", ["0/3", "4/3", "2", "a/b"])
def test_a_malformed_part_is_refused(agreement, monkeypatch, capsys, part):
    with pytest.raises(SystemExit):
        _args(agreement, monkeypatch, "--part", part)
    assert "expected K/N with 1 <= K <= N" in capsys.readouterr().err


@pytest.mark.parametrize(
    "sampler, family, options",
    [
        ("dpmpp_2m:12:1:0:shared5", "dpmpp_2m:12:1:shared5", {"cpu_amp": False, "shared_steps": 5}),
        ("dpmpp_2m:8:0:2:cpu_amp:shared3", "dpmpp_2m:8:0:cpu_amp:shared3", {"cpu_amp": True, "shared_steps": 3}),
        ("ddim:10", "ddim:10:0", {"cpu_amp": False, "shared_steps": 0}),
    ],
)
def test_shared_steps_reach_the_evaluation_and_name_their_family(
    agreement, monkeypatch, tmp_path, sampler, family, options
):
    seen = {}

    def run(**kwargs):
        seen.update(kwargs)
        folder = Path(kwargs["output_dir"])
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({"num_subjects": 1}))
        (folder / "metrics_per_subject.csv").write_text("subject_id,dice_TC,dice_WT,dice_ET,dice_mean\ns1,1,1,1,1\n")

    monkeypatch.setattr(agreement, "run", run)
    args = _args(agreement, monkeypatch, "--samplers", sampler, "--out", str(tmp_path))
    agreement.evaluate(args, sampler, "0" * 64)
    assert {key: seen[key] for key in options} == options
    assert agreement.family(sampler) == family


@pytest.mark.parametrize("option", ["sharedx", "amp", "shared2:shared3"])
def test_a_malformed_sampler_option_is_refused_before_sampling(agreement, monkeypatch, capsys, option):
    with pytest.raises(SystemExit):
        _args(agreement, monkeypatch, "--samplers", f"dpmpp_2m:12:1:0:{option}", "ddpm:1000")
    assert "the fields after the seed are 'cpu_amp' and 'sharedK'" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["ddim", "ddim:ten", "dpmpp_2m:12:one", "dpmpp_2m:12:1:0.5"])
def test_a_malformed_sampler_field_is_refused_before_sampling(agreement, monkeypatch, capsys, sampler):
    with pytest.raises(SystemExit):
        _args(agreement, monkeypatch, "--samplers", sampler, "ddpm:1000")
    assert f"--samplers: sampler {sampler!r}" in capsys.readouterr().err


def test_the_paired_table_averages_seeds_then_pairs_subjects(agreement, monkeypatch, capsys):
    """Per subject the family's seeds are averaged, then differenced with the reference; the row holds their mean, an
    interval around it inside the subjects' range, the agreement verdict and the subject of the largest difference."""
    fast = {"s1": 0.90, "s2": 0.80, "s3": 1.00, "s4": 0.70}
    other_seed = {"s1": 0.92, "s2": 0.80, "s3": 0.00, "s4": 0.72}
    reference = {"s1": 0.90, "s2": 0.81, "s3": 1.00, "s4": 0.70}
    results = {
        "ddim:10:0:0": _stored(None, fast),
        "ddim:10:0:1": _stored(None, other_seed),
        "ddpm:1000:0:0": _stored(None, reference),
    }
    args = _args(agreement, monkeypatch, "--samplers", *results)
    rows = agreement.print_paired_table(args, results)["rows"]
    by_hand = [(fast[s] + other_seed[s]) / 2 - reference[s] for s in sorted(reference)]  # +0.01, -0.01, -0.5, +0.01
    for region in ("TC", "WT", "ET", "mean"):
        row = rows[f"ddim:10:0/{region}"]
        low, high = row["interval_95"]
        assert row["seeds"] == 2 and row["subjects"] == 4
        assert row["mean_difference"] == pytest.approx(sum(by_hand) / 4)
        assert min(by_hand) <= low <= row["mean_difference"] <= high <= max(by_hand)
        assert row["agrees"] is False
        assert row["largest_subject_difference"] == {"subject": "s3", "difference": pytest.approx(-0.5)}
    assert "| -0.5000 (s3) |" in capsys.readouterr().out


def test_all_or_nothing_subjects_are_counted_and_left_out_of_a_second_table(agreement, monkeypatch, capsys):
    """A subject scoring exactly 0 or 1 in every run (an empty region in the truth) is listed with each family's runs
    scoring 1; the second table is the first without it, by hand. A subject at 1 in every run is not listed."""
    fast = {"s1": 0.90, "s2": 0.80, "s3": 1.00, "s4": 0.70, "s5": 1.0}
    other_seed = {"s1": 0.91, "s2": 0.83, "s3": 0.00, "s4": 0.70, "s5": 1.0}
    reference = {"s1": 0.90, "s2": 0.81, "s3": 0.00, "s4": 0.70, "s5": 1.0}
    results = {
        "ddim:10:0:0": _stored(None, fast),
        "ddim:10:0:1": _stored(None, other_seed),
        "ddpm:1000:0:0": _stored(None, reference),
    }
    args = _args(agreement, monkeypatch, "--samplers", *results)
    paired = agreement.print_paired_table(args, results)
    for region in ("TC", "WT", "ET", "mean"):
        assert paired["all_or_nothing"][region] == {"s3": {"ddim:10:0": [1, 2], "ddpm:1000:0": [0, 1]}}
        with_it, without = (
            paired["rows"][f"ddim:10:0/{region}"],
            paired["rows_without_all_or_nothing"][f"ddim:10:0/{region}"],
        )
        assert with_it["subjects"] == 5 and without["subjects"] == 4
        by_hand = [(fast[s] + other_seed[s]) / 2 - reference[s] for s in ("s1", "s2", "s4", "s5")]
        assert without["mean_difference"] == pytest.approx(sum(by_hand) / 4)
        assert with_it["mean_difference"] == pytest.approx((sum(by_hand) + 0.5) / 5)
        assert without["agrees"] is True and with_it["agrees"] is False
    out = capsys.readouterr().out
    assert "ET of s3 is all or nothing" in out and "ddim:10:0 1/2, ddpm:1000:0 0/1" in out
    assert "the same without s3" in out
