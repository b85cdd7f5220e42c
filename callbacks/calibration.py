"""At the end of fit, choose the sampling strength on held-out seeds: the weakest that corrects the biased prompts
without changing the fair prompts' images.

A refiner is trained at one strength, but how far that strength corrects depends on the world it was trained
for. The same recipe (``configs/toy.yaml``) left the shipped toy world's targeted prompts at 0.03-0.06 stereotype
(two CPUs; limit 0.1 x uncorrected) at strength 1, and a weaker-bias world (seed 11, one targeted group, rate 0.6) at
0.125 / 0.031 (limit 0.053); strength 1.5 corrected that world (0.016 / 0.00, other groups' SSIM 0.951) but moved
the shipped world's other groups (SSIM 0.920). Like a guidance scale, the strength is a dial set without
retraining; :class:`SamplingCalibration` sets it per fit, from measurements, the way a user would:

1. sample the validation prompts on held-out seeds without the correction; a prompt whose stereotype rate
   is at least ``min_biased_rate`` is *biased*, the others are *fair*;
2. try the candidate ``strengths`` in ascending order, each on the same seeds, and stop at the first that
   corrects every biased prompt (stereotype rate <= ``stereotype_ratio`` x its uncorrected rate, gender
   consistency >= ``min_gender_consistency``), or at the first that changes a fair prompt's images (SSIM to
   uncorrected < ``min_ssim``);
3. keep the first that corrects; when none does, the weakest of those that keep the fair prompts' images
   with the smallest *shortfall*: the biased prompts' stereotype rates over their limits plus their gender
   consistencies under theirs, i.e. the share of images still wrong. The first candidate is kept whatever
   it does: it is the trained default.

Taking the strongest candidate when none corrects would pay for nothing when the shortfall stops falling:
on the seed-11 world one targeted prompt's gender stayed at 0.833 / 0.854 / 0.854 / 0.854 for strengths
1 / 1.25 / 1.5 / 2 (a residue of flips no strength fixed), and strength 2 cost that prompt's diversity
(0.64 against 1.26 at strength 1 in the report).

The default ``stereotype_ratio`` is half the efficacy target's 0.1: a rate is measured on a few dozen seeds,
and the report measures it on others. On the seed-11 world, strength 1 left cyran woman at 2 stereotyped
images of 48 calibration seeds (0.042, under 0.1 x 0.5) and at 8 of the report's 64 (0.125); calibrating to
the target itself would have kept that strength.

The chosen strength becomes the module's sampling strength, so the export (``strength`` in ``config.json``)
and the end-of-fit report use it; ``calibration.json`` in the log folder holds every candidate's numbers.
Callbacks' ``on_fit_end`` runs in list order, so this one must come before ``ExportRefiner`` and
``ToyEfficacyReport`` (it refuses to start otherwise). Under DDP the ranks share the sampling and the
metrics are reduced across them, so every rank reaches the same choice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from rsc.atomic import write_json_atomic
from rsc.callbacks.measures import Judges, ValidationPrompt, measure
from rsc.callbacks.protocol import as_corrector
from rsc.classifiers.base import AttributeClassifier
from rsc.config import check_number
from rsc.sampling import sample

CALIBRATION_FILE = "calibration.json"


@dataclass
class CandidateResult:
    """One candidate strength measured on the calibration seeds.

    Attributes:
        strength: The sampling strength tried.
        stereotype_rate: Corrected stereotype rate per biased prompt.
        ssim: SSIM of the corrected images to the uncorrected ones per fair prompt.
        gender_consistency: Corrected gender consistency per biased prompt.
        corrects: Every biased prompt's rate is <= ``stereotype_ratio`` x its uncorrected rate, and its gender
            consistency is >= ``min_gender_consistency`` (where one is asked for and the prompt names a gender).
        preserves: Every fair prompt's SSIM is >= ``min_ssim``.
        shortfall: How far the biased prompts are from corrected: the sum of their stereotype rates over the
            limit and their gender consistencies under the minimum (0 when ``corrects``).
    """

    strength: float
    stereotype_rate: dict[str, float]
    ssim: dict[str, float]
    gender_consistency: dict[str, float | None]
    corrects: bool
    preserves: bool
    shortfall: float


#: ``evaluate(strength) -> (stereotype rate per prompt, SSIM per prompt, gender consistency per prompt)`` of the
#: corrected images on the calibration seeds.
Evaluate = Callable[[float], tuple[dict[str, float], dict[str, float], dict[str, float | None]]]


def search_strength(
    evaluate: Evaluate,
    strengths: Sequence[float],
    uncorrected_rates: dict[str, float],
    biased: Sequence[str],
    fair: Sequence[str],
    stereotype_ratio: float = 0.05,
    min_ssim: float = 0.95,
    min_gender_consistency: float | None = None,
) -> tuple[float, list[CandidateResult]]:
    """The weakest of ``strengths`` (ascending) that corrects every biased prompt while every fair prompt keeps
    its images, else the weakest of those that keep them with the smallest shortfall; and every candidate
    measured (see the module docstring; the defaults are :class:`SamplingCalibration`'s).

    Candidates after the first that corrects, or after the first that changes a fair prompt's images, are not
    measured. Without biased prompts there is nothing to correct: the first candidate, unmeasured.
    """
    if not biased:
        return float(strengths[0]), []
    results: list[CandidateResult] = []
    for index, strength in enumerate(strengths):
        rates, ssim, gender = evaluate(float(strength))
        # The tolerance only absorbs float rounding (0 -> 0 meets "at most 0.1x").
        stereotype_excess = sum(max(0.0, rates[key] - stereotype_ratio * uncorrected_rates[key] - 1e-9) for key in biased)
        gender_deficit = 0.0 if min_gender_consistency is None else sum(
            max(0.0, min_gender_consistency - gender[key]) for key in biased if gender.get(key) is not None)
        result = CandidateResult(
            strength=float(strength),
            stereotype_rate={key: rates[key] for key in biased},
            ssim={key: ssim[key] for key in fair},
            gender_consistency={key: gender.get(key) for key in biased},
            corrects=stereotype_excess == 0.0 and gender_deficit == 0.0,
            preserves=all(ssim[key] >= min_ssim for key in fair),
            shortfall=stereotype_excess + gender_deficit,
        )
        results.append(result)
        if result.corrects and (result.preserves or index == 0):
            return result.strength, results
        if not result.preserves:
            break  # a stronger correction moves the fair prompts' images further
    # None corrects: the trained default, or a stronger candidate that keeps the images and comes closer.
    eligible = [results[0], *(r for r in results[1:] if r.preserves)]
    best = min(r.shortfall for r in eligible)
    return next(r.strength for r in eligible if r.shortfall <= best + 1e-9), results


class SamplingCalibration(Callback):
    """Choose the sampling strength when fit ends, on held-out seeds (see the module docstring).

    Args:
        classifier: Attribute classifier with a binary stereotype attribute (the validation callback's).
        prompts: Prompts to calibrate on; which are biased is measured, not configured, so one config
            serves worlds that target other groups.
        seeds: Seeds per prompt, ``first_seed ...``.
        first_seed: First seed; keep the seeds apart from those the reports are measured on.
        strengths: Candidate sampling strengths, ascending; the first is kept when no other qualifies.
        stereotype_ratio: A biased prompt is corrected at a stereotype rate <= this x its uncorrected rate
            (a margin under the efficacy target's 0.1 for the sampling noise of ``seeds``).
        min_gender_consistency: ... and at a gender consistency >= this (``None``: not a criterion).
        min_ssim: A fair prompt keeps its images at an SSIM to uncorrected >= this.
        min_biased_rate: A prompt is biased when its uncorrected stereotype rate is >= this.
        steps: Sampling steps.
        guidance_scale: Classifier-free guidance.
        batch_size: Sampling batch size.
        group_attribute, gender_attribute, stereotype_attribute: The classifier's attributes.
        stereotype_threshold: Probability above which an image counts as stereotyped.
    """

    def __init__(
        self,
        classifier: AttributeClassifier,
        prompts: list[ValidationPrompt],
        seeds: int = 48,
        first_seed: int = 1000,
        strengths: list[float] | None = None,
        stereotype_ratio: float = 0.05,
        min_gender_consistency: float | None = 0.9,
        min_ssim: float = 0.95,
        min_biased_rate: float = 0.15,
        steps: int = 20,
        guidance_scale: float = 7.5,
        batch_size: int = 64,
        group_attribute: str = "group",
        gender_attribute: str | None = "gender",
        stereotype_attribute: str = "stereotype",
        stereotype_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        strengths = [1.0, 1.25, 1.5, 2.0] if strengths is None else list(strengths)
        if not strengths:
            raise ValueError("SamplingCalibration.strengths must name at least one strength")
        for index, strength in enumerate(strengths):
            check_number(f"SamplingCalibration.strengths[{index}]", strength, positive=True)
        if any(b <= a for a, b in zip(strengths, strengths[1:])):
            raise ValueError(f"SamplingCalibration.strengths must be strictly ascending, got {strengths}")
        check_number("SamplingCalibration.seeds", seeds, positive=True, integer=True)
        check_number("SamplingCalibration.first_seed", first_seed, minimum=0, integer=True)
        check_number("SamplingCalibration.stereotype_ratio", stereotype_ratio, minimum=0)
        check_number("SamplingCalibration.min_ssim", min_ssim, maximum=1)
        if min_gender_consistency is not None:
            check_number("SamplingCalibration.min_gender_consistency", min_gender_consistency, minimum=0, maximum=1)
        check_number("SamplingCalibration.min_biased_rate", min_biased_rate, positive=True, maximum=1)
        if not prompts:
            raise ValueError("SamplingCalibration.prompts is empty: give the prompts to calibrate on")
        self.prompts = [p if isinstance(p, ValidationPrompt) else ValidationPrompt(**p) for p in prompts]
        self.judges = Judges(classifier=classifier, group_attribute=group_attribute, gender_attribute=gender_attribute,
                             stereotype_attribute=stereotype_attribute, stereotype_threshold=stereotype_threshold)
        self.judges.groups(self.prompts, "SamplingCalibration")  # every attribute and prompt value exists
        self.seeds, self.first_seed, self.strengths = int(seeds), int(first_seed), [float(s) for s in strengths]
        self.stereotype_ratio, self.min_gender_consistency = stereotype_ratio, min_gender_consistency
        self.min_ssim, self.min_biased_rate = min_ssim, min_biased_rate
        self.steps, self.guidance_scale, self.batch_size = steps, guidance_scale, batch_size
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a callback list where another callback's ``on_fit_end`` (an export, a report) runs first: it would
        use the trained strength, not the calibrated one."""
        if stage != "fit":
            return
        mine = next(index for index, callback in enumerate(trainer.callbacks) if callback is self)
        earlier = [type(c).__name__ for c in trainer.callbacks[:mine] if is_overridden("on_fit_end", c, Callback)]
        if earlier:
            raise ValueError(f"SamplingCalibration must come before {earlier} in trainer.callbacks: their on_fit_end "
                             f"runs first and would use the trained strength, not the calibrated one")

    def state_dict(self) -> dict[str, Any]:
        """The last calibration (JSON-like)."""
        return {"result": self.result}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the last calibration."""
        self.result = state_dict.get("result")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Calibrate (every rank measures its share), set the chosen strength and save ``calibration.json``."""
        corrector = as_corrector(pl_module, "SamplingCalibration")
        if not hasattr(type(corrector), "sampling_strength"):
            raise TypeError(f"SamplingCalibration needs a module with a settable sampling_strength "
                            f"(rsc.module.RSCorrector); {type(corrector).__name__} has none")
        # trainer.log_dir broadcasts under DDP: every rank must ask for it.
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        was_training = pl_module.training
        pl_module.eval()
        result = self.calibrate(corrector, trainer.global_rank, trainer.world_size)
        pl_module.train(was_training)
        self.result = result
        corrector.sampling_strength = result["strength"]
        if trainer.is_global_zero:
            write_json_atomic(out_dir / CALIBRATION_FILE, result)
            for logger in trainer.loggers:
                logger.log_metrics({"calibration/strength": result["strength"]}, step=trainer.global_step)
            rank_zero_info(format_calibration(result))

    @torch.no_grad()
    def calibrate(self, corrector: Any, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
        """Sample, measure and choose; the ``calibration.json`` payload.

        Under DDP every rank calls it with its rank: each samples every ``world_size``-th (prompt, seed) item,
        and :func:`rsc.callbacks.measures.measure` reduces the metrics across ranks (torchmetrics), so every
        rank measures the same numbers, takes the same steps of the search and returns the same choice.
        """
        seeds = list(range(self.first_seed, self.first_seed + self.seeds))
        items = [(index, seed) for index in range(len(self.prompts)) for seed in seeds]
        if len(items) < world_size:
            raise ValueError(f"SamplingCalibration has {len(items)} (prompt, seed) items for {world_size} processes: "
                             f"raise seeds to at least {-(-world_size // len(self.prompts))}")
        order = torch.arange(len(items))[rank::world_size]
        prompt_ids = torch.tensor([items[i][0] for i in order.tolist()])
        texts = [self.prompts[i].prompt for i in prompt_ids.tolist()]
        my_seeds = [items[i][1] for i in order.tolist()]
        self.judges.classifier.to(corrector.device)
        kwargs: dict[str, Any] = dict(steps=self.steps, guidance_scale=self.guidance_scale, batch_size=self.batch_size,
                                      progress=False)
        uncorrected = sample(corrector.ldm, texts, my_seeds, **kwargs).images
        before = measure(self.judges, self.prompts, prompt_ids, order, uncorrected, where="SamplingCalibration")
        rates = {key: row["stereotype_rate"] for key, row in before["per_prompt"].items()}
        biased = [key for key, rate in rates.items() if rate is not None and rate >= self.min_biased_rate]
        fair = [key for key in rates if key not in biased]

        def evaluate(strength: float) -> tuple[dict[str, float], dict[str, float], dict[str, float | None]]:
            images = sample(corrector.ldm, texts, my_seeds, correction=corrector.correction(strength),
                            correction_window=corrector.correction_window, **kwargs).images
            after = measure(self.judges, self.prompts, prompt_ids, order, images, baseline=uncorrected,
                            where="SamplingCalibration")["per_prompt"]
            rank_zero_info(f"calibration: strength {strength:g} measured")
            return ({k: r["stereotype_rate"] for k, r in after.items()}, {k: r["ssim"] for k, r in after.items()},
                    {k: r.get("gender_consistency") for k, r in after.items()})

        strength, candidates = search_strength(evaluate, self.strengths, rates, biased, fair, self.stereotype_ratio,
                                               self.min_ssim, self.min_gender_consistency)
        return {
            "strength": strength,
            "trained_default": self.strengths[0],
            "biased_prompts": biased,
            "fair_prompts": fair,
            "uncorrected_stereotype_rate": rates,
            "candidates": [asdict(c) for c in candidates],
            "criteria": {"stereotype_ratio": self.stereotype_ratio, "min_gender_consistency": self.min_gender_consistency,
                         "min_ssim": self.min_ssim, "min_biased_rate": self.min_biased_rate},
            # The correction's other settings, which every candidate shares.
            "sampling": {"seeds": self.seeds, "first_seed": self.first_seed, "steps": self.steps,
                         "guidance_scale": self.guidance_scale, "window": list(corrector.correction_window),
                         "threshold": getattr(corrector, "sampling_threshold", None)},
        }


def format_calibration(result: dict[str, Any]) -> str:
    """The calibration as a short table: per candidate, the worst biased prompt's rate and the worst fair SSIM."""
    lines = [f"Sampling calibration ({result['sampling']['seeds']} held-out seeds per prompt): "
             f"strength {result['strength']:g}; biased prompts {', '.join(result['biased_prompts']) or 'none'}"]
    for candidate in result["candidates"]:
        worst_rate = max(candidate["stereotype_rate"].values(), default=float("nan"))
        worst_ssim = min(candidate["ssim"].values(), default=float("nan"))
        worst_gender = min((v for v in candidate["gender_consistency"].values() if v is not None), default=float("nan"))
        verdict = "corrects" if candidate["corrects"] else f"under-corrects, shortfall {candidate['shortfall']:.3f}"
        lines.append(f"  strength {candidate['strength']:<5g} worst stereotype {worst_rate:.3f}, gender {worst_gender:.3f} "
                     f"({verdict}), worst fair SSIM {worst_ssim:.3f} "
                     f"({'keeps' if candidate['preserves'] else 'changes'} the fair prompts' images)")
    return "\n".join(lines)
