"""The demo refiner that ships with rsc: ``configs/toy.yaml`` fitted on the shipped toy world.

A demo fit takes 8-20 min on two CPU cores, too long for every test run, so the refiner it trains
ships in ``rsc/toy/demo_refiner``, like the world it was trained on:

* ``refiner/``: the export (``--refiner rsc/toy/demo_refiner/refiner`` works everywhere an export does);
* ``efficacy.json`` / ``efficacy.png``: the end-of-fit efficacy report of that fit;
* ``calibration.json``: how that fit chose the sampling strength in the export (:mod:`rsc.callbacks.calibration`);
* ``fit.json``: what produced it: a fingerprint of the config, the world and the code the fit ran (the
  ``rsc`` modules it imported, docstrings and comments ignored), with the machine, versions and the
  validation callback's last values.

The tests check that the fingerprint is current (a change to the recipe or to the code it runs must
ship a refitted refiner) and measure the shipped refiner again with the current sampling and judges.
``python -m rsc.demo refit`` (``scripts/refit_demo.sh``) fits the demo again, checks its acceptance
criteria (:func:`acceptance_failures`), compares it with the shipped one and, with ``--ship``,
replaces it. ``python -m rsc.demo info`` says whether the shipped refiner is current and prints its report.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import yaml

from rsc.atomic import write_folder_atomic, write_json_atomic
from rsc.cli import UserInputError, run_cli

REPO = Path(__file__).resolve().parents[1]
#: The recipe the demo fits (a source checkout's ``configs/toy.yaml``).
DEMO_CONFIG = REPO / "configs" / "toy.yaml"
#: Where the demo refiner ships.
SHIPPED_DEMO_DIR = Path(__file__).parent / "toy" / "demo_refiner"
FIT_RECORD = "fit.json"
#: Bump when the way a demo is fitted changes in a way the recorded code does not show.
DEMO_VERSION = 1

#: Floors for the efficacy targets the shipped recipe does not reach yet (issue 12 wants quality within 0.5
#: of the non-targeted reference, diversity >= 0.9x and SSIM >= 0.95): a refiner that smears or collapses
#: the corrected faces, or changes the other groups' images, falls below them.
QUALITY_FLOOR_BELOW = 2.0
DIVERSITY_FLOOR = 0.6
NON_TARGETED_SSIM_FLOOR = 0.93
#: The uncorrected toy SD must show at least this share of the world's planted stereotype rate: the floor the
#: world's own build checks (``stereotype_floor`` in :func:`rsc.toy.manifest.world_targets`, a local there).
PLANTED_SHARE = 0.7

#: How far a refit may land from the shipped run (the weights differ bit-wise across CPUs and BLAS builds,
#: and a few borderline images flip): per prompt, on the corrected value.
REFIT_TOLERANCE = {"stereotype_rate": 0.08, "gender_consistency": 0.08, "group_match": 0.05, "quality": 0.35,
                   "diversity": 0.5, "ssim": 0.02}
#: How far the shipped refiner, measured again, may land from its recorded report (no training in between:
#: only sampling on another CPU can move an image, so two images of 64 at most).
REMEASURE_TOLERANCE = {"stereotype_rate": 2 / 64, "gender_consistency": 2 / 64, "group_match": 2 / 64,
                       "quality": 0.1, "diversity": 0.1, "ssim": 0.005}


# ---------------------------------------------------------------------------------------------- fingerprint
def _without_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` without docstrings (imports stay: a new import can change what the fit runs)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [child for child in body if not (
                isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str))]
            node.body = kept or [ast.Pass()]
    return tree


def _stable_dump(node: Any) -> str:
    """``ast.dump`` without its empty fields: the same text on Python 3.11-3.13 (3.12 added empty ``type_params``
    everywhere, 3.13 drops empty fields from ``ast.dump``), so the fingerprint does not follow the interpreter."""
    if isinstance(node, ast.AST):
        fields = ((name, _stable_dump(getattr(node, name, None))) for name in node._fields)
        return f"{type(node).__name__}(" + ", ".join(f"{name}={text}" for name, text in fields if text not in ("None", "[]")) + ")"
    if isinstance(node, list):
        return "[" + ", ".join(_stable_dump(item) for item in node) + "]"
    return repr(node)


def module_source_hash(modules: Sequence[str]) -> str:
    """sha256 of the code of ``modules`` (import names), ignoring docstrings, comments and formatting.

    Raises:
        UserInputError: A module no longer exists (the recorded fit ran code that is gone: refit).
    """
    digest = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise UserInputError(f"module {name}, which the demo fit ran, no longer exists: refit the demo "
                                 f"(bash scripts/refit_demo.sh --ship)")
        source = Path(spec.origin).read_text(encoding="utf-8")
        tree = _without_docstrings(ast.parse(source, filename=spec.origin))
        digest.update(name.encode() + b"\0" + _stable_dump(tree).encode() + b"\0")
    return digest.hexdigest()


def fit_modules(loaded: Sequence[str] | None = None) -> list[str]:
    """The ``rsc`` modules loaded in this process (after a fit: the code the fit ran).

    ``rsc.toy`` is left out (the world's fingerprint covers it: a toy code change rebuilds the world, and
    the world's fingerprint is part of the demo's), and so is this module (it drives a refit; what the
    fit computes is in :mod:`rsc.fit`, :mod:`rsc.relocate` and what they load).
    """
    names = sys.modules if loaded is None else loaded
    return sorted(
        name for name in names
        if (name == "rsc" or name.startswith("rsc.")) and not (name == "rsc.toy" or name.startswith("rsc.toy."))
        and name not in ("rsc.demo", "rsc.__main__")
    )


def demo_fingerprint(config: dict[str, Any], world_fingerprint: str, modules: Sequence[str]) -> str:
    """Hash of the fit config (as parsed), the world's fingerprint and the code of ``modules``."""
    payload = json.dumps({"version": DEMO_VERSION, "config": config, "world": world_fingerprint,
                          "code": module_source_hash(modules)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def current_fingerprint(modules: Sequence[str], config_path: str | os.PathLike[str] = DEMO_CONFIG,
                        world: str | os.PathLike[str] | None = None) -> str:
    """The fingerprint a demo fit of ``config_path`` on ``world`` (default: the shipped one) would get now."""
    from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

    config = yaml.safe_load(Path(config_path).read_text())
    manifest = load_toy_world(SHIPPED_WORLD_DIR if world is None else world).manifest
    return demo_fingerprint(config, manifest["fingerprint"], modules)


def read_fit_record(demo_dir: str | os.PathLike[str] = SHIPPED_DEMO_DIR) -> dict[str, Any]:
    """``fit.json`` of a shipped (or refitted) demo folder."""
    path = Path(demo_dir) / FIT_RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {demo_dir} is not a demo refiner folder (python -m rsc.demo refit)")
    record = json.loads(path.read_text())
    missing = [key for key in ("fingerprint", "modules", "world_fingerprint") if key not in record]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; expected the record written by python -m rsc.demo refit")
    return record


def is_current(demo_dir: str | os.PathLike[str] = SHIPPED_DEMO_DIR, config_path: str | os.PathLike[str] = DEMO_CONFIG,
               world: str | os.PathLike[str] | None = None) -> tuple[bool, str, str]:
    """Whether the demo in ``demo_dir`` is what a fit of ``config_path`` on ``world`` would produce now.

    Returns:
        (current, the recorded fingerprint, the fingerprint now).
    """
    record = read_fit_record(demo_dir)
    now = current_fingerprint(record["modules"], config_path, world)
    return record["fingerprint"] == now, record["fingerprint"], now


# ---------------------------------------------------------------------------------------------- acceptance
def acceptance_failures(report: dict[str, Any], planted_rate: float) -> list[str]:
    """What an efficacy report of the demo misses (empty: accepted).

    Met by the recipe (issue 12's targets, every prompt): stereotype <= 0.1x, group match >= 0.95, targeted
    gender consistency >= 0.9 per prompt. Floors for the rest (:data:`QUALITY_FLOOR_BELOW`,
    :data:`DIVERSITY_FLOOR`, :data:`NON_TARGETED_SSIM_FLOOR`). And the uncorrected SD must show the planted bias.
    """
    failures = []
    groups, prompts, targets, reference = report["per_group"], report["per_prompt"], report["targets"], report["reference"]
    for name, row in groups.items():
        if row["targeted"] and row["stereotype_rate"][0] < PLANTED_SHARE * planted_rate:
            failures.append(f"{name}: the uncorrected SD shows stereotype rate {row['stereotype_rate'][0]:.3f}, "
                            f"under {PLANTED_SHARE} x the planted {planted_rate}")
    for name in ("targeted_stereotype_rate_at_most_0.1x", "group_match_at_least_0.95"):
        if not targets[name]["ok"]:
            failures.append(f"target {name} missed: worst {targets[name]['worst_prompt']}, margin {targets[name]['margin']:+.3f}")
    for key, row in prompts.items():
        if row["targeted"]:
            # The paper's headline, per prompt (a group mean can hide one gender pushed towards the other).
            if row["gender_consistency"][1] < 0.9:
                failures.append(f"{key}: corrected gender consistency {row['gender_consistency'][1]:.3f} < 0.9")
            floor = reference["non_targeted_uncorrected_quality"] - QUALITY_FLOOR_BELOW
            if row["quality"][1] < floor:
                failures.append(f"{key}: corrected quality {row['quality'][1]:.2f} < floor {floor:.2f}")
            floor = DIVERSITY_FLOOR * reference["non_targeted_uncorrected_diversity"]
            if row["diversity"][1] < floor:
                failures.append(f"{key}: corrected diversity {row['diversity'][1]:.2f} < floor {floor:.2f}")
        elif row["group"] is not None and row["ssim"] < NON_TARGETED_SSIM_FLOOR:
            failures.append(f"{key}: non-targeted images changed (SSIM {row['ssim']:.3f} < {NON_TARGETED_SSIM_FLOOR})")
    return failures


def validation_failures(record: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """Whether the fairness validation callback's last values (8 seeds per prompt) tell the report's story.

    ``record`` is a fit record (``fit.json``): its ``validation`` values, the step they were measured at and the
    fit's last step. Values measured before the last step judge other weights than the report's: a failure.
    """
    values, step, last = record["validation"], record.get("validation_step"), record.get("global_step")
    if step != last:
        return [f"validation: the last fairness validation ran at step {step}, the fit ended at step {last}: "
                "it judged other weights than the report (validate on a step cadence that divides max_steps)"]
    failures = []
    for name, row in report["per_group"].items():
        corrected, uncorrected = values[f"val/stereotype_rate/{name}"], values[f"val/stereotype_rate_uncorrected/{name}"]
        if row["targeted"] and not corrected < uncorrected / 2:
            failures.append(f"validation: {name} stereotype {uncorrected:.3f} -> {corrected:.3f}, not halved")
        # At most one of a non-targeted group's 16 images may flip.
        if not row["targeted"] and corrected > uncorrected + 1 / 16:
            failures.append(f"validation: non-targeted {name} stereotype {uncorrected:.3f} -> {corrected:.3f}")
        if not row["targeted"] and values[f"val/ssim/{name}"] < 0.85:
            failures.append(f"validation: non-targeted {name} SSIM {values[f'val/ssim/{name}']:.3f} < 0.85")
    return failures


def report_differences(report: dict[str, Any], reference: dict[str, Any], tolerance: dict[str, float]) -> list[str]:
    """Per prompt, the corrected measures of ``report`` that differ from ``reference``'s by more than ``tolerance``."""
    differences = []
    for key, row in reference["per_prompt"].items():
        other = report["per_prompt"].get(key)
        if other is None:
            differences.append(f"{key}: missing")
            continue
        for name, allowed in tolerance.items():
            mine, theirs = other[name], row[name]
            if isinstance(theirs, list):
                mine, theirs = mine[1], theirs[1]
            if mine is None or theirs is None:
                continue
            if abs(mine - theirs) > allowed + 1e-9:
                differences.append(f"{key}: {name} {mine:.3f} vs {theirs:.3f} (tolerance {allowed:g})")
    return differences


# ---------------------------------------------------------------------------------------------- measuring
def measure_demo(demo_dir: str | os.PathLike[str] = SHIPPED_DEMO_DIR, world: str | os.PathLike[str] | None = None,
                 samples_per_prompt: int | None = None) -> dict[str, Any]:
    """Sample and judge the toy prompts with and without the demo refiner in ``demo_dir``: a fresh efficacy report.

    The sampling (seeds, steps, guidance) is the recorded report's, so the two can be compared.
    """
    import torch

    from rsc.callbacks.toy_efficacy import toy_efficacy
    from rsc.export import load_refiner_for
    from rsc.identity import BackboneConfigs
    from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

    demo_dir = Path(demo_dir)
    recorded = json.loads((demo_dir / "efficacy.json").read_text())["sampling"]
    loaded = load_toy_world(SHIPPED_WORLD_DIR if world is None else world)
    ldm = loaded.load_backbone()
    exported = load_refiner_for(demo_dir / "refiner", BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler))
    with torch.no_grad():
        result = toy_efficacy(
            str(loaded.path), ldm, exported.correction(x0_predictor=ldm.predict_x0), exported.info.correction_window,
            samples_per_prompt or recorded["samples_per_prompt"], recorded["first_seed"], recorded["steps"],
            recorded["guidance_scale"],
        )
    return result.report


# ---------------------------------------------------------------------------------------------- refit and ship
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def refit(out: str | os.PathLike[str], config_path: str | os.PathLike[str] = DEMO_CONFIG,
          world: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
          extra_args: Sequence[str] = ()) -> Path:
    """Fit the demo config on ``world`` (default: the shipped one) into ``out/run``; write ``fit.json`` beside its report.

    ``extra_args`` (e.g. ``--model.strength 1.2``) are passed to ``rsc.fit``; a run with any is recorded
    but has no fingerprint (the fingerprint covers the config file only) and cannot ship.

    Returns:
        The folder of the fit's export, report and ``fit.json`` (the logger's, e.g. ``out/run/version_0``).
    """
    from rsc.callbacks.fairness import FairnessValidation
    from rsc.fit import main as fit_main
    from rsc.relocate import relocate_toy_fit_config
    from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

    out = Path(out).resolve()
    run = out / "run"
    if run.exists():
        raise FileExistsError(f"{run} exists: choose a new --out folder (a refit never mixes two runs)")
    world = Path(SHIPPED_WORLD_DIR if world is None else world)
    config = relocate_toy_fit_config(config_path, world, run, cache_dir or out / "cache")
    relocated = out / "toy.yaml"
    relocated.parent.mkdir(parents=True, exist_ok=True)
    relocated.write_text(yaml.safe_dump(config))
    start = time.time()
    cli = fit_main(["--config", str(relocated), *extra_args])
    seconds = time.time() - start
    modules = fit_modules()
    [fairness] = [c for c in cli.trainer.callbacks if isinstance(c, FairnessValidation)] or [None]
    import torch

    from rsc.toy.train_sd import cpu_has_native_bf16

    manifest = load_toy_world(world).manifest
    record = {
        "fingerprint": current_fingerprint(modules, config_path, world) if not extra_args else None,
        "extra_args": list(extra_args),
        "config": Path(config_path).name,
        "world_fingerprint": manifest["fingerprint"],
        "modules": modules,
        "fit_seconds": round(seconds, 1),
        # The CPU's name does not say whether it has native bf16, which sets the speed of a bf16 step.
        "machine": {"cpu": _cpu_name(), "native_bf16": cpu_has_native_bf16(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "precision": str(cli.trainer.precision)},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "validation": dict(fairness.last_values) if fairness is not None else {},
        # The step the validation judged and the fit's last: the check below compares them.
        "validation_step": fairness.last_step if fairness is not None else None,
        "global_step": cli.trainer.global_step,
    }
    # The logger's folder (``run/version_N``) holds the export and the report.
    results = Path(cli.trainer.log_dir or run)
    write_json_atomic(results / FIT_RECORD, record)
    return results


def ship(run: str | os.PathLike[str], demo_dir: str | os.PathLike[str] = SHIPPED_DEMO_DIR) -> Path:
    """Replace ``demo_dir`` (as a whole, atomically) by the refit in ``run``: its export, report, grid and record.

    The export's ``config.json`` names the backbone and data by the repository-relative paths of the shipped
    world, not by the refit's absolute ones.
    """
    from rsc.callbacks.calibration import CALIBRATION_FILE
    from rsc.export import ExportInfo, export_refiner
    from rsc.refiner import LatentRefiner
    from rsc.relocate import SHIPPED_WORLD

    run = Path(run)
    record = read_fit_record(run)
    if record["fingerprint"] is None:
        raise UserInputError(f"{run} was fitted with extra arguments {record['extra_args']}: only the config as shipped can ship")

    def write(staging: Path) -> None:
        info = ExportInfo.from_config_file(run / "refiner" / "config.json")
        info = replace(info, backbone=f"{SHIPPED_WORLD}/sd", training_data={"dataset": f"{SHIPPED_WORLD}/preferences"})
        export_refiner(LatentRefiner.from_pretrained(run / "refiner"), staging / "refiner", info)
        for name in ("efficacy.json", "efficacy.png", FIT_RECORD):
            shutil.copy2(run / name, staging / name)
        if (run / CALIBRATION_FILE).is_file():  # a recipe with SamplingCalibration: why the export's strength
            shutil.copy2(run / CALIBRATION_FILE, staging / CALIBRATION_FILE)

    return write_folder_atomic(demo_dir, write)


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rsc.demo``; a bad input ends with one line (:mod:`rsc.cli`)."""
    return run_cli(_main, argv, "rsc.demo")


def planted_stereotype_rate(world: str | os.PathLike[str] | None = None) -> float:
    """The stereotype rate planted in ``world``'s targeted groups (default: the shipped world)."""
    from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

    return load_toy_world(SHIPPED_WORLD_DIR if world is None else world).manifest["config"]["bias"]["stereotype_rate_targeted"]


def _main(argv: list[str] | None) -> int:
    from rsc.callbacks.toy_efficacy import format_efficacy_report

    parser = argparse.ArgumentParser(prog="python -m rsc.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="is the shipped demo refiner current? its recorded report")
    info.add_argument("--demo", type=Path, default=SHIPPED_DEMO_DIR, help="a demo folder (default: the shipped one)")
    measure = commands.add_parser("measure", help="measure the shipped demo refiner again and compare with its report")
    measure.add_argument("--demo", type=Path, default=SHIPPED_DEMO_DIR)
    again = commands.add_parser("refit", help="fit configs/toy.yaml again, check it and compare it with the shipped one")
    again.add_argument("--out", type=Path, default=REPO / "runs" / "demo_refit", help="a new folder for the run")
    again.add_argument("--config", type=Path, default=DEMO_CONFIG)
    again.add_argument("--ship", action="store_true", help="replace the shipped demo refiner if the refit is accepted")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "refit":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    if args.command == "info":
        current, recorded, now = is_current(args.demo)
        record = read_fit_record(args.demo)
        print(f"demo refiner {args.demo}: fingerprint {recorded} ({'current' if current else f'STALE: a fit now would be {now}'})")
        print(f"fitted in {record['fit_seconds']:.0f} s on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
              f"torch {record['versions']['torch']}")
        print(format_efficacy_report(json.loads((args.demo / "efficacy.json").read_text())))
        return 0 if current else 1
    if args.command == "measure":
        recorded = json.loads((args.demo / "efficacy.json").read_text())
        report = measure_demo(args.demo)
        print(format_efficacy_report(report))
        problems = acceptance_failures(report, planted_stereotype_rate()) + report_differences(report, recorded, REMEASURE_TOLERANCE)
        for problem in problems:
            print(f"  [FAIL] {problem}")
        return 1 if problems else 0

    run = refit(args.out, args.config, extra_args=extra)
    report = json.loads((run / "efficacy.json").read_text())
    record = read_fit_record(run)
    failures = acceptance_failures(report, planted_stereotype_rate()) + validation_failures(record, report)
    shipped = SHIPPED_DEMO_DIR / "efficacy.json"
    differences = report_differences(report, json.loads(shipped.read_text()), REFIT_TOLERANCE) if shipped.is_file() else []
    print(f"\nrefit in {record['fit_seconds']:.0f} s ({record['machine']['cpu']}): {run}")
    for failure in failures:
        print(f"  [FAIL] {failure}")
    for difference in differences:
        print(f"  [DIFFERS from the shipped demo] {difference}")
    if args.ship:
        if failures:
            print("not shipped: the refit misses its acceptance criteria", file=sys.stderr)
            return 1
        ship(run)
        print(f"shipped: {SHIPPED_DEMO_DIR} replaced by the refit (fingerprint {record['fingerprint']})")
        return 0
    return 1 if failures or differences else 0


if __name__ == "__main__":
    sys.exit(main())
