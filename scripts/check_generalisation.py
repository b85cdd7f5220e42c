"""Train the shipped demo config on toy worlds it was not tuned on, and print its efficacy on each.

    bash scripts/check_generalisation.sh            # the shipped world + two other worlds
    bash scripts/check_generalisation.sh --only seed7-ardan-cyran
    bash scripts/check_generalisation.sh --fit-seeds 0 1 2   # three fits per world: their spread

Each world differs from the shipped one in its seed, its targeted groups and its planted bias
strength; the recipe (``configs/toy.yaml``) is used unchanged, only its paths move
(:func:`rsc.relocate.relocate_toy_fit_config`) and, with ``--fit-seeds``, its seeds (``seed_everything``,
``model.seed``, ``data.seed``): one fit's result moves with its seed (the worst targeted gender
consistency of one world was 0.86 with seed 0 and 0.73 with seed 1), so a recipe change is told from
noise only over several. Worlds are built (30-56 min each on 2 CPU cores) and fits run (about 10 min
each) only where their results are missing, so a killed check resumes. Results:
``<out>/<world>/run/efficacy.json`` (fit seed 0; ``run-seed<N>`` for the others), ``<out>/summary.md``
with a table of each fit's worst values, and ``<out>/summary.json``. The shipped world's seed-0 fit is
the shipped demo refiner (``rsc/toy/demo_refiner``): while that is current, its report is used.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from rsc.atomic import write_json_atomic
from rsc.callbacks.toy_efficacy import format_efficacy_report
from rsc.demo import DEMO_CONFIG, SHIPPED_DEMO_DIR, acceptance_failures, is_current
from rsc.relocate import relocate_toy_fit_config
from rsc.toy.data import BiasSpec
from rsc.toy.world import SHIPPED_WORLD_DIR, ToyWorldConfig, build_toy_world

REPO = Path(__file__).resolve().parents[1]

# Other seeds, other targeted groups, other bias strengths than the shipped world (seed 0, belor + dovek,
# stereotype 0.85, gender flips 0.4): two targeted groups with a weaker bias, one targeted group weaker still.
WORLDS: dict[str, ToyWorldConfig | None] = {
    "shipped": None,
    "seed7-ardan-cyran": ToyWorldConfig.full(
        seed=7, bias=BiasSpec(targeted_groups=("ardan", "cyran"), stereotype_rate_targeted=0.7, gender_flip_rate_targeted=0.3)
    ),
    "seed11-cyran": ToyWorldConfig.full(
        seed=11, bias=BiasSpec(targeted_groups=("cyran",), stereotype_rate_targeted=0.6, gender_flip_rate_targeted=0.25)
    ),
}


def run_dir_name(fit_seed: int) -> str:
    """A fit's folder under its world: ``run`` for seed 0 (the results of earlier checks stay valid), ``run-seed<N>``."""
    return "run" if fit_seed == 0 else f"run-seed{fit_seed}"


def seeded_fit_config(config: Path, world: Path, run_dir: Path, cache_dir: Path, fit_seed: int) -> dict[str, Any]:
    """``config`` relocated to ``world`` and ``run_dir``, with every seed of the fit set to ``fit_seed``.

    ``seed_everything`` sets the refiner's initialisation and the training noise, ``data.seed`` the order of the
    pairs, ``model.seed`` the validation noise. The calibration's and the report's seeds stay: every fit is judged
    on the same images.
    """
    relocated = relocate_toy_fit_config(config, world, run_dir, cache_dir)
    relocated["seed_everything"] = fit_seed
    relocated.setdefault("model", {})["seed"] = fit_seed
    relocated.setdefault("data", {})["seed"] = fit_seed
    return relocated


def fit(world: Path, run_dir: Path, config: Path, cache_dir: Path, fit_seed: int) -> dict:
    """Fit ``config`` on ``world`` with ``fit_seed`` in a subprocess (resuming a killed fit) and return its efficacy report."""
    report = run_dir / "efficacy.json"
    if not report.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        relocated = run_dir / "config.yaml"
        relocated.write_text(yaml.safe_dump(seeded_fit_config(config, world, run_dir, cache_dir, fit_seed)))
        resume = ["--ckpt_path", "last"] if (run_dir / "checkpoints" / "last.ckpt").exists() else []
        subprocess.run([sys.executable, "-m", "rsc.fit", "--config", str(relocated), *resume], check=True, cwd=REPO)
        [found] = sorted(run_dir.rglob("efficacy.json"))
        if found != report:
            shutil.copyfile(found, report)
    return json.loads(report.read_text())


def shipped_demo_report(config: Path) -> dict | None:
    """The shipped demo's efficacy report when it is the seed-0 fit of ``config`` on the shipped world as the code is now."""
    if config.resolve() != DEMO_CONFIG.resolve():
        return None
    current, _, _ = is_current()
    return json.loads((SHIPPED_DEMO_DIR / "efficacy.json").read_text()) if current else None


def worst_values(report: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Per measure, the worst corrected value over the prompts it is judged on, with that prompt's name.

    Targeted prompts: the highest stereotype rate, the lowest gender consistency, quality and diversity;
    non-targeted prompts that name a group: the lowest SSIM to their uncorrected images.
    """
    targeted = {key: row for key, row in report["per_prompt"].items() if row["targeted"]}
    others = {key: row for key, row in report["per_prompt"].items() if not row["targeted"] and row["group"] is not None}

    def pick(rows: dict[str, Any], value: Any, highest: bool = False) -> tuple[float, str]:
        key = (max if highest else min)(rows, key=lambda name: value(rows[name]))
        return float(value(rows[key])), key.removeprefix("a_photo_of_a_").replace("_", " ")

    return {
        "stereotype": pick(targeted, lambda row: row["stereotype_rate"][1], highest=True),
        "gender": pick(targeted, lambda row: row["gender_consistency"][1]),
        "quality": pick(targeted, lambda row: row["quality"][1]),
        "diversity": pick(targeted, lambda row: row["diversity"][1]),
        "ssim": pick(others, lambda row: row["ssim"]),
    }


def spread_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """A markdown table with one row per fit: its worst values and whether the demo's acceptance criteria hold."""
    lines = [
        "| world | fit seed | worst targeted stereotype | worst targeted gender | worst non-targeted SSIM "
        "| worst targeted quality | worst targeted diversity | acceptance |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        for fit_seed, fitted in result["fits"].items():
            worst = worst_values(fitted["efficacy"])
            cells = [f"{worst[key][0]:.3f} ({worst[key][1]})" for key in ("stereotype", "gender", "ssim")]
            cells += [f"{worst[key][0]:.2f} ({worst[key][1]})" for key in ("quality", "diversity")]
            verdict = "holds" if not fitted["failures"] else f"{len(fitted['failures'])} missed"
            lines.append(f"| {name} | {fit_seed} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Build the worlds, fit, print the per-world reports and the table of fits; exit status 1 if a fit misses the demo's acceptance criteria."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "generalisation")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG)
    parser.add_argument("--only", nargs="+", choices=sorted(WORLDS), default=sorted(WORLDS))
    parser.add_argument("--fit-seeds", nargs="+", type=int, default=[0], metavar="SEED",
                        help="fit each world once per seed (default: 0)")
    args = parser.parse_args(argv)
    if any(seed < 0 for seed in args.fit_seeds):
        parser.error(f"--fit-seeds must be non-negative integers, got {args.fit_seeds}")
    results: dict[str, dict[str, Any]] = {}
    for name in args.only:
        world_config = WORLDS[name]
        world = SHIPPED_WORLD_DIR if world_config is None else build_toy_world(
            args.out / name / "world", world_config, progress=False
        ).path
        manifest = json.loads((Path(world) / "manifest.json").read_text())
        if not manifest.get("meets_targets", False):
            print(f"{name}: the world misses its own targets (see {world}/manifest.json); its fits are still run")
        planted = manifest["config"]["bias"]["stereotype_rate_targeted"]
        fits = {}
        for fit_seed in sorted(set(args.fit_seeds)):
            shipped = shipped_demo_report(args.config) if world_config is None and fit_seed == 0 else None
            if shipped is not None:
                print(f"{name}, fit seed 0: the shipped demo refiner is that fit (its fingerprint is current); its report is used")
            efficacy = shipped if shipped is not None else fit(
                Path(world), args.out / name / run_dir_name(fit_seed), args.config, args.out / "cache", fit_seed
            )
            fits[str(fit_seed)] = {"efficacy": efficacy, "failures": acceptance_failures(efficacy, planted)}
        results[name] = {
            "world": {"seed": manifest["seed"], **manifest["config"]["bias"], "meets_targets": manifest.get("meets_targets")},
            "fits": fits,
        }
    write_json_atomic(args.out / "summary.json", results)
    lines = []
    for name, result in results.items():
        world = result["world"]
        for fit_seed, fitted in result["fits"].items():
            lines += [
                f"## {name}, fit seed {fit_seed}: world seed {world['seed']}, targeted {', '.join(world['targeted_groups'])}, "
                f"stereotype rate {world['stereotype_rate_targeted']}, gender flips {world['gender_flip_rate_targeted']}",
                "",
                "```",
                format_efficacy_report(fitted["efficacy"]),
                "```",
                "",
            ]
            if fitted["failures"]:
                lines += ["Misses the demo's acceptance criteria:", ""] + [f"- {failure}" for failure in fitted["failures"]] + [""]
    lines += ["## Every fit: its worst values", ""] + spread_table(results) + [""]
    (args.out / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if any(fitted["failures"] for result in results.values() for fitted in result["fits"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
