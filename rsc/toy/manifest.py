"""A toy world's manifest: what a build measured, the targets it checks, and comparing two worlds.

:func:`write_manifest` gathers the stage results of a finished build (sizes, timings, the
judges' accuracies, the SD's per-prompt statistics) into ``manifest.json`` together with
:func:`world_targets`' verdict; :func:`format_manifest` prints it (``python -m rsc.toy info``);
:func:`compare_worlds` checks a rebuilt world against a reference (``python -m rsc.toy compare``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from datasets import DatasetDict, load_from_disk

from rsc.atomic import write_json_atomic
from rsc.backbone import FrozenLDM
from rsc.toy.classifier import ToyAttributeClassifier
from rsc.toy.data import toy_prompts
from rsc.toy.evaluate import format_statistics
from rsc.toy.quality import ToyQualityJudge
from rsc.toy.train_sd import resolve_precision

if TYPE_CHECKING:
    from rsc.toy.world import ToyWorld, ToyWorldConfig

# Bump when a change of design alters what a build produces (code changes are caught by toy_source_hash).
TOY_WORLD_VERSION = 3
_TOY_PACKAGE = Path(__file__).parent


def _code_only(tree: ast.AST) -> ast.AST:
    """``tree`` without docstrings and import statements: what a build computes, not how it is described."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        kept = [
            child for child in body
            if not isinstance(child, ast.Import | ast.ImportFrom)
            and not (isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str))
        ]
        node.body = kept or [ast.Pass()]
    return tree


def toy_source_hash(package: Path = _TOY_PACKAGE) -> str:
    """sha256 of the code of the toy-world modules (``rsc/toy/*.py`` but the CLI), ignoring comments,
    docstrings, formatting and import lines, so that only a change to what the build computes changes it."""
    digest = hashlib.sha256()
    for source in sorted(package.glob("*.py")):
        if source.name == "__main__.py":
            continue
        tree = _code_only(ast.parse(source.read_text(encoding="utf-8"), filename=str(source)))
        digest.update(source.name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of rsc, the toy-world design and the libraries a build used."""
    import datasets
    import diffusers
    import transformers

    import rsc

    return {
        "rsc": rsc.__version__,
        "toy_world": str(TOY_WORLD_VERSION),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
    }


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def world_targets(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The checks a built world must pass, each ``{"value", "wanted", "ok"}``.

    Fidelity: VAE PSNR >= 28 dB on held-out renders; the SD's samples of every non-targeted
    prompt within 1 point of the clean renders' facial quality; group match >= 0.9 for every
    prompt. Judges: the classifier >= 0.98 per attribute on held-out renders and >= 0.95 on the
    SD's views of renders. The planted bias, scaled to its planted strength: every targeted
    prompt's stereotype rate >= 0.7 x the planted rate, and every targeted group's gender
    consistency <= 1 - 0.75 x the planted caption-gender flip rate (0.6 and 0.7 for the default
    bias). Gender is checked per group: the flips are planted symmetrically (a group's woman
    and man prompts each meant to show the wrong gender 40% of the time), but a model may resolve them
    towards one gender, so its two prompts can straddle the limit while the group keeps the
    planted rate; the per-prompt values are in the statistics.
    """
    bias = manifest["config"]["bias"]
    statistics = manifest["statistics"]
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, value: float, wanted: str, ok: bool) -> None:
        checks[name] = {"value": round(float(value), 4), "wanted": wanted, "ok": bool(ok)}

    check("vae_psnr_db", statistics["vae_psnr_db"], ">= 28", statistics["vae_psnr_db"] >= 28.0)
    for view, accuracy in statistics["classifier_heldout_accuracy"].items():
        limit = 0.98 if view == "renders" else 0.95
        worst = min(accuracy.values())
        check(f"classifier_accuracy/{view}", worst, f">= {limit} for every attribute", worst >= limit)
    stereotype_floor = 0.7 * bias["stereotype_rate_targeted"]
    consistency_ceiling = 1.0 - 0.75 * bias["gender_flip_rate_targeted"]
    for prompt, group, _ in toy_prompts():
        rates = statistics["per_prompt"][prompt]
        check(f"group_match/{prompt}", rates["group_match"], ">= 0.9", rates["group_match"] >= 0.9)
        if group in bias["targeted_groups"]:
            check(f"stereotype_rate/{prompt}", rates["stereotype_rate"], f">= {stereotype_floor:.2f}",
                  rates["stereotype_rate"] >= stereotype_floor)
        else:
            gap = rates["render_quality"] - rates["quality"]
            check(f"quality_gap_to_renders/{prompt}", gap, "<= 1.0", gap <= 1.0)
    for group in bias["targeted_groups"]:
        consistency = statistics["per_group"][group]["gender_consistency"]
        check(f"gender_consistency/{group}", consistency, f"<= {consistency_ceiling:.2f}", consistency <= consistency_ceiling)
    return checks


def _winner_sources(preferences: DatasetDict) -> dict[str, dict[str, float]]:
    """Per group, the share of anti-stereotypical images drawn by the model and by the renderer."""
    rows = [row for split in preferences.values() for row in split.select_columns(["group", "anti_stereotypical_source"])]
    shares: dict[str, dict[str, float]] = {}
    for group in sorted({row["group"] for row in rows}):
        sources = [row["anti_stereotypical_source"] for row in rows if row["group"] == group]
        shares[group] = {source: round(sources.count(source) / len(sources), 4) for source in ("model", "render")}
    return shares


def write_manifest(
    work: Path, config: ToyWorldConfig, fingerprint: str, stage_times: dict[str, float], threads: int,
    versions: dict[str, str],
) -> None:
    """Gather a finished build's stage results in ``work`` into ``manifest.json``, with the targets' verdict."""
    statistics = json.loads((work / "statistics.json").read_text())
    preferences = load_from_disk(str(work / "preferences"))
    sd = FrozenLDM.from_pretrained(work / "sd")
    manifest = {
        "fingerprint": fingerprint,
        "seed": config.seed,
        "versions": versions,
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": threads,
            "vae_precision": resolve_precision(config.vae.precision),
        },
        "config": config.to_dict(),
        # Derived, so not in the config: the rate the training captions were flipped at.
        "caption_flip_rate_targeted": round(config.bias.caption_flip_rate_targeted, 4),
        "stage_seconds": stage_times,
        "build_seconds": round(sum(stage_times.values()), 1),
        "sizes": {
            "train_images": config.num_train_images,
            "unet_parameters": sum(p.numel() for p in sd.unet.parameters()),
            "vae_parameters": sum(p.numel() for p in sd.vae.parameters()),
            "text_encoder_parameters": sum(p.numel() for p in sd.text_encoder.parameters()),
            "classifier_parameters": sum(p.numel() for p in ToyAttributeClassifier.from_pretrained(work / "classifier").parameters()),
            "quality_judge_parameters": sum(p.numel() for p in ToyQualityJudge.from_pretrained(work / "quality").parameters()),
            "preference_pairs": {split: preferences[split].num_rows for split in preferences},
            "eval_images": config.eval_samples_per_prompt * len(toy_prompts()),
            "bytes": {name: _folder_size(work / name) for name in ("sd", "classifier", "quality", "preferences")},
        },
        "statistics": {
            "vae_psnr_db": round(json.loads((work / "vae_psnr.json").read_text())["psnr_db"], 2),
            "classifier_heldout_accuracy": json.loads((work / "classifier_accuracy.json").read_text()),
            "quality_judge": json.loads((work / "quality_judge.json").read_text()),
            "eval_seeds": [0, config.eval_samples_per_prompt - 1],
            "sampling": {"steps": config.sampling_steps, "guidance_scale": config.guidance_scale, "scheduler": "DDIMScheduler"},
            "winner_sources": _winner_sources(preferences),
            **statistics,
        },
    }
    manifest["targets"] = world_targets(manifest)
    manifest["meets_targets"] = all(check["ok"] for check in manifest["targets"].values())
    write_json_atomic(work / "manifest.json", manifest)


def compare_worlds(built: ToyWorld, reference: ToyWorld, tolerance: float = 0.05) -> tuple[bool, list[str]]:
    """Compare a (re)built world with a reference: per-file sha256 of the weights, and every per-prompt rate.

    Returns ``(ok, lines)``: ``ok`` is False when the fingerprints differ, the built world misses
    its targets, or a per-prompt rate (group match, gender consistency, stereotype rate) differs
    by more than ``tolerance``. Bit-identical weights are reported but not required: float
    rounding differs across CPUs and BLAS builds.
    """
    lines: list[str] = []
    ok = built.manifest["fingerprint"] == reference.manifest["fingerprint"]
    lines.append(f"fingerprint: {built.manifest['fingerprint']} vs {reference.manifest['fingerprint']}" + ("" if ok else "  DIFFERENT"))
    for weights in sorted(reference.path.rglob("*.safetensors")):
        relative = weights.relative_to(reference.path)
        other = built.path / relative
        same = other.is_file() and hashlib.sha256(other.read_bytes()).digest() == hashlib.sha256(weights.read_bytes()).digest()
        lines.append(f"{str(relative):<52} {'identical' if same else 'differs bit-wise'}")
    built_rates, reference_rates = built.manifest["statistics"]["per_prompt"], reference.manifest["statistics"]["per_prompt"]
    for prompt, rates in reference_rates.items():
        for name in ("group_match", "gender_consistency", "stereotype_rate"):
            mine = built_rates.get(prompt, {}).get(name)
            if mine is None or abs(mine - rates[name]) > tolerance:
                ok = False
                lines.append(f"{prompt} {name}: {mine} vs {rates[name]} (tolerance {tolerance})  DIFFERENT")
    if not built.manifest.get("meets_targets", False):
        ok = False
        lines.append("the built world misses its targets (see `python -m rsc.toy info`)")
    lines.append("worlds agree" if ok else "worlds DISAGREE")
    return ok, lines


def format_manifest(manifest: dict[str, Any]) -> str:
    """A plain-text summary of a world's manifest: sizes, judges, per-prompt statistics, caption words, targets."""
    statistics = manifest["statistics"]
    targeted = tuple(manifest["config"]["bias"]["targeted_groups"])
    lines = [
        f"toy world {manifest['fingerprint']} (seed {manifest['seed']}, targeted {', '.join(targeted)}), "
        f"built in {manifest['build_seconds']:.0f} s: "
        + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in manifest["stage_seconds"].items()),
    ]
    if "vae_psnr_db" in statistics:
        lines.append(f"VAE PSNR on held-out renders: {statistics['vae_psnr_db']:.2f} dB")
    bias = manifest["config"]["bias"]
    planted = f"planted bias: stereotype {bias['stereotype_rate_targeted']}, gender flips {bias['gender_flip_rate_targeted']}"
    if "caption_flip_rate_targeted" in manifest:
        planted += (f" (captions flipped at {manifest['caption_flip_rate_targeted']}: guidance sharpening "
                    f"{bias['guidance_sharpening']})")
    lines.append(planted)
    lines.append("classifier held-out accuracy: " + json.dumps(statistics["classifier_heldout_accuracy"]))
    lines.append("preference pairs: " + json.dumps(manifest["sizes"]["preference_pairs"]))
    if "winner_sources" in statistics:
        lines.append("anti-stereotypical images drawn by the model: " + ", ".join(
            f"{group} {shares['model']:.2f}" for group, shares in statistics["winner_sources"].items()))
    lines.append(format_statistics(statistics, targeted))
    for title, key in (("caption words", "descriptors"), ("prompts naming no group", "unnamed_group")):
        if key not in statistics:
            continue
        lines.append(f"{title}:")
        for prompt, rates in statistics[key].items():
            extra = ""
            if "group_frequencies" in rates:
                extra = " groups " + " ".join(f"{g} {f:.2f}" for g, f in rates["group_frequencies"].items())
                extra += f", KL to uniform {rates['kl_to_uniform']:.3f}"
            lines.append(f"  {prompt:<42} stereotype {rates['stereotype_rate']:.2f}{extra}")
    if "targets" in manifest:
        missed = [name for name, check in manifest["targets"].items() if not check["ok"]]
        lines.append(
            f"targets: {len(manifest['targets']) - len(missed)} of {len(manifest['targets'])} met"
            + ("" if not missed else "; MISSED: " + "; ".join(
                f"{name} = {manifest['targets'][name]['value']} (wanted {manifest['targets'][name]['wanted']})" for name in missed))
        )
    return "\n".join(lines)
