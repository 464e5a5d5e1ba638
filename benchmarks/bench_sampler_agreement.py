"""Dice of fast samplers against 1000-step DDPM on a trained checkpoint, through the bundle's ``evaluate.json``.

Runs the evaluation workflow once per sampler (same checkpoint, subjects, ensemble and seed), then prints each
sampler's seconds and mean Dice per region, and the difference to the reference sampler (the last one given).
With the defaults it evaluates the committed demo checkpoint ``bundle/models/model.pt`` on the validation split of
the README's synthetic data set (write it first with README command 1's ``synth`` and ``datalist`` steps):

    python benchmarks/bench_sampler_agreement.py --samplers ddim:10 ddim:25 ddpm:1000 --out agreement

A sampler is ``scheduler:steps[:eta[:seed]]`` (eta: DDIM stochasticity, seed: the sampler's noise seed, default 0).
``--reference`` reuses the reference's summary from an earlier run's ``agreement.json`` instead of running it again
(a 1000-step DDPM run is the slow one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from monai.bundle import run

REGIONS = ("TC", "WT", "ET", "mean")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="bundle/configs/evaluate.json")
    parser.add_argument("--samplers", nargs="+", default=["ddim:10", "ddpm:1000"], help="see above; last = reference")
    parser.add_argument("--reference", help="agreement.json of an earlier run holding the reference's summary")
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--out", default="sampler_agreement")
    parser.add_argument("--overrides", default="{}", help="JSON dict of further evaluate.json overrides")
    return parser.parse_args()


def evaluate(args: argparse.Namespace, sampler: str) -> dict:
    """Run ``evaluate.json`` with one sampler; returns its summary plus the seconds it took."""
    scheduler, steps, *rest = sampler.split(":")
    eta, seed = (float(rest[0]) if rest else 0.0), (int(rest[1]) if len(rest) > 1 else 0)
    output_dir = Path(args.out) / sampler.replace(":", "_")
    begin = time.perf_counter()
    run(
        run_id="run",
        config_file=args.config,
        scheduler=scheduler,
        num_inference_steps=int(steps),
        eta=eta,
        seed=seed,
        ensemble_size=args.ensemble,
        include_hd95=False,
        output_dir=str(output_dir),
        **json.loads(args.overrides),
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    return {**summary, "seconds": time.perf_counter() - begin}


def main() -> None:
    args = parse_args()
    reference_name = args.samplers[-1]
    stored = json.loads(Path(args.reference).read_text()) if args.reference else {}
    results = {name: stored[name] if name in stored else evaluate(args, name) for name in args.samplers}
    reference = results[reference_name]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "agreement.json").write_text(json.dumps(results, indent=1))
    print(f"\nensemble {args.ensemble}, {reference['num_subjects']} subjects, reference {reference_name}\n")
    print("| sampler | seconds | " + " | ".join(f"Dice {r}" for r in REGIONS) + " | max abs Dice difference |")
    print("|---|---|" + "---|" * len(REGIONS) + "---|")
    for name, summary in results.items():
        dice = [summary[f"dice_{r}"]["mean"] for r in REGIONS]
        difference = max(abs(d - reference[f"dice_{r}"]["mean"]) for d, r in zip(dice, REGIONS, strict=True))
        cells = " | ".join(f"{d:.4f}" for d in dice)
        print(f"| {name} | {summary['seconds']:.1f} | {cells} | {difference:.4f} |")


if __name__ == "__main__":
    main()
