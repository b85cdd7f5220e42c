"""SamplingCalibration: the strength search, and the callback that sets its choice for the export and the report."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fitting import AlwaysStereotyped
from rsc.callbacks.calibration import CALIBRATION_FILE, SamplingCalibration, search_strength
from rsc.callbacks.export import ExportRefiner
from rsc.callbacks.measures import Judges, ValidationPrompt, measure
from rsc.classifiers import ToyClassifier
from rsc.module import RSCorrector
from rsc.sampling import sample
from rsc.toy.data import toy_prompts
from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

BIASED, FAIR = ["a_belor_woman", "a_dovek_man"], ["an_ardan_woman", "a_cyran_man"]
UNCORRECTED = {"a_belor_woman": 0.6, "a_dovek_man": 0.5, "an_ardan_woman": 0.0, "a_cyran_man": 0.0}


def _table(rates: dict[float, tuple[float, float]], ssim: dict[float, float]):  # noqa: ANN202
    """A fake evaluation: per strength, the two biased prompts' rates and both fair prompts' SSIM; records the calls."""
    calls: list[float] = []

    def evaluate(strength: float) -> tuple[dict[str, float], dict[str, float], dict[str, float | None]]:
        calls.append(strength)
        woman, man = rates[strength]
        return ({"a_belor_woman": woman, "a_dovek_man": man, "an_ardan_woman": 0.0, "a_cyran_man": 0.0},
                {key: ssim[strength] for key in (*BIASED, *FAIR)}, {key: 1.0 for key in BIASED})

    return evaluate, calls


def test_search_stops_at_the_weakest_strength_that_corrects() -> None:
    # 0.1 x 0.6 = 0.06 and 0.1 x 0.5 = 0.05: strength 1 leaves belor at 0.1, 1.5 corrects both.
    evaluate, calls = _table({1.0: (0.10, 0.02), 1.5: (0.05, 0.05), 2.0: (0.0, 0.0)}, {1.0: 0.98, 1.5: 0.96, 2.0: 0.90})
    chosen, results = search_strength(evaluate, [1.0, 1.5, 2.0], UNCORRECTED, BIASED, FAIR, stereotype_ratio=0.1)
    assert chosen == 1.5
    assert calls == [1.0, 1.5]  # 2.0 is never sampled
    assert [(r.corrects, r.preserves) for r in results] == [(False, True), (True, True)]
    assert results[0].stereotype_rate == {"a_belor_woman": 0.10, "a_dovek_man": 0.02}
    assert set(results[0].ssim) == set(FAIR)  # SSIM is judged on the fair prompts only


def test_search_keeps_the_last_strength_that_keeps_the_fair_prompts_images() -> None:
    evaluate, calls = _table({1.0: (0.3, 0.3), 1.25: (0.2, 0.1), 1.5: (0.0, 0.0), 2.0: (0.0, 0.0)},
                             {1.0: 0.99, 1.25: 0.951, 1.5: 0.949, 2.0: 0.90})
    chosen, results = search_strength(evaluate, [1.0, 1.25, 1.5, 2.0], UNCORRECTED, BIASED, FAIR)
    # 1.5 would correct, but it changes the fair prompts' images: 1.25, the strongest that keeps them.
    assert chosen == 1.25
    assert calls == [1.0, 1.25, 1.5]
    assert results[-1].corrects and not results[-1].preserves


def test_search_keeps_the_trained_default_when_even_it_changes_the_fair_images() -> None:
    evaluate, calls = _table({1.0: (0.3, 0.3), 2.0: (0.0, 0.0)}, {1.0: 0.90, 2.0: 0.99})
    assert search_strength(evaluate, [1.0, 2.0], UNCORRECTED, BIASED, FAIR)[0] == 1.0
    assert calls == [1.0]


def test_search_takes_the_closest_when_none_corrects_and_all_keep_the_images() -> None:
    evaluate, calls = _table({1.0: (0.3, 0.3), 1.5: (0.2, 0.2), 2.0: (0.1, 0.1)}, {1.0: 0.99, 1.5: 0.98, 2.0: 0.97})
    chosen, results = search_strength(evaluate, [1.0, 1.5, 2.0], UNCORRECTED, BIASED, FAIR, stereotype_ratio=0.1)
    assert chosen == 2.0
    assert calls == [1.0, 1.5, 2.0]
    # Over the limits 0.06 and 0.05: (0.3 - 0.06) + (0.3 - 0.05), ..., (0.1 - 0.06) + (0.1 - 0.05).
    assert [r.shortfall for r in results] == pytest.approx([0.49, 0.29, 0.09])


def test_search_takes_the_weakest_of_the_closest_when_stronger_ones_stop_helping() -> None:
    # The seed-11 world's calibration: the stereotype is gone from strength 1.25 on, and one prompt's gender
    # stays at 41 of 48 seeds however strong the correction; 1.5 and 2 only cost diversity.
    gender = {1.0: 40 / 48, 1.25: 41 / 48, 1.5: 41 / 48, 2.0: 41 / 48}
    rates = {1.0: 0.021, 1.25: 0.0, 1.5: 0.0, 2.0: 0.0}

    def evaluate(strength: float):  # noqa: ANN202
        return ({**{key: 0.0 for key in UNCORRECTED}, "a_belor_woman": rates[strength]}, {key: 0.99 for key in UNCORRECTED},
                {"a_belor_woman": gender[strength], "a_dovek_man": 1.0})

    chosen, results = search_strength(evaluate, [1.0, 1.25, 1.5, 2.0], UNCORRECTED, BIASED, FAIR, min_gender_consistency=0.9)
    assert chosen == 1.25
    assert [r.corrects for r in results] == [False] * 4
    assert [r.shortfall for r in results] == pytest.approx([0.9 - 40 / 48, 0.9 - 41 / 48, 0.9 - 41 / 48, 0.9 - 41 / 48])


def test_search_asks_for_gender_consistency_when_told() -> None:
    def evaluate(strength: float):  # noqa: ANN202
        gender = {1.0: 0.85, 1.5: 0.95}[strength]
        return ({key: 0.0 for key in UNCORRECTED}, {key: 0.99 for key in UNCORRECTED},
                {"a_belor_woman": gender, "a_dovek_man": None})  # a prompt naming no gender is not judged on it

    # At strength 1 the stereotype is gone but belor woman's images show the wrong gender 15% of the time.
    assert search_strength(evaluate, [1.0, 1.5], UNCORRECTED, BIASED, FAIR)[0] == 1.0
    chosen, results = search_strength(evaluate, [1.0, 1.5], UNCORRECTED, BIASED, FAIR, min_gender_consistency=0.9)
    assert chosen == 1.5 and [r.corrects for r in results] == [False, True]


def test_search_without_biased_prompts_samples_nothing() -> None:
    evaluate, calls = _table({}, {})
    assert search_strength(evaluate, [1.0, 2.0], UNCORRECTED, [], [*BIASED, *FAIR]) == (1.0, [])
    assert calls == []


def test_a_rate_of_zero_before_and_after_is_corrected() -> None:
    evaluate, _ = _table({1.0: (0.0, 0.0)}, {1.0: 0.99})
    _, [result] = search_strength(evaluate, [1.0], {**UNCORRECTED, "a_belor_woman": 0.0}, BIASED, FAIR)
    assert result.corrects


@pytest.mark.parametrize(("field", "value", "message"), [
    ("strengths", [1.5, 1.0], "strictly ascending"),
    ("strengths", [], "at least one"),
    ("strengths", [1.0, float("nan")], r"strengths\[1\]"),
    ("seeds", 0, "SamplingCalibration.seeds"),
    ("min_ssim", 1.5, "SamplingCalibration.min_ssim"),
    ("prompts", [], "prompts is empty"),
    ("prompts", [ValidationPrompt("a photo of an elf", group="elf")], r"prompts\[0\].group='elf'"),
])
def test_config_errors_name_the_field(field: str, value: object, message: str) -> None:
    kwargs = dict(classifier=ToyClassifier(load_toy_world(SHIPPED_WORLD_DIR).classifier_path),
                  prompts=[ValidationPrompt("a photo of a belor woman", group="belor", gender="woman")])
    with pytest.raises(ValueError, match=message):
        SamplingCalibration(**{**kwargs, field: value})


def test_the_callback_sets_its_choice_for_the_export_and_records_what_it_measured(tmp_path: Path) -> None:
    world = load_toy_world(SHIPPED_WORLD_DIR)
    module = RSCorrector(backbone=str(world.sd_path), hidden_channels=16, num_blocks=1, embedding_dim=16,
                         norm_groups=4, correction_window=(0.0, 0.5), strength=1.0, learning_rate=1e-6)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a refiner that visibly changes the samples
        for parameter in (module.refiner.conv_out.weight, module.refiner.conv_out.bias):
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    prompts = [ValidationPrompt(p, group=g, gender=s) for p, g, s in toy_prompts()][:4]
    sampling = dict(steps=8, guidance_scale=7.0)
    calibration = SamplingCalibration(AlwaysStereotyped(world.classifier_path), prompts, seeds=2, first_seed=5,
                                      strengths=[0.5, 2.5], min_gender_consistency=None, batch_size=16, **sampling)
    cond = module.ldm.encode_prompt(["a photo of a belor woman"] * 2, do_classifier_free_guidance=False).cond
    shape = (2, module.ldm.latent_channels, 16, 16)
    batch = {"anti_stereotypical_latents": torch.randn(shape, generator=generator),
             "stereotypical_latents": torch.randn(shape, generator=generator), "prompt_embeds": cond,
             "index": torch.tensor([0, 1])}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[calibration, ExportRefiner(str(tmp_path / "refiner"))])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))

    # Nothing is ever corrected and there are no fair prompts: every candidate is tried; each is as far from
    # corrected (every image stereotyped, gender not a criterion), so the weakest is chosen, not the trained 1...
    recorded = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert recorded == calibration.result
    assert recorded["strength"] == 0.5 and [c["strength"] for c in recorded["candidates"]] == [0.5, 2.5]
    assert [c["shortfall"] for c in recorded["candidates"]] == pytest.approx([len(prompts) * 0.95] * 2)
    assert recorded["biased_prompts"] == [p.key for p in prompts] and recorded["fair_prompts"] == []
    # ... and it is what the module samples with and what the export tells every frontend.
    assert module.sampling_strength == 0.5 and module.correction().strength == 0.5
    assert json.loads((tmp_path / "refiner" / "config.json").read_text())["strength"] == 0.5

    # The candidates' numbers are measurements at their own strength on the calibration seeds.
    judges = Judges(classifier=ToyClassifier(world.classifier_path))
    seeds = [5, 6]
    prompt_ids = torch.arange(len(prompts)).repeat_interleave(len(seeds))
    texts = [prompts[i].prompt for i in prompt_ids.tolist()]
    measured = {}
    for strength in (0.5, 2.5):
        images = sample(module.ldm, texts, seeds * len(prompts), correction=module.correction(strength),
                        correction_window=module.correction_window, batch_size=16, progress=False, **sampling).images
        rows = measure(judges, prompts, prompt_ids, torch.arange(len(texts)), images)["per_prompt"]
        measured[strength] = {key: row["gender_consistency"] for key, row in rows.items()}
    assert measured[0.5] != measured[2.5], "the test refiner must change some verdicts between the strengths"
    for candidate in recorded["candidates"]:
        assert candidate["gender_consistency"] == pytest.approx(measured[candidate["strength"]], abs=1e-12)


def test_the_callback_refuses_to_come_after_a_callback_that_uses_the_strength_at_fit_end(tmp_path: Path) -> None:
    world = load_toy_world(SHIPPED_WORLD_DIR)
    module = RSCorrector(backbone=str(world.sd_path), hidden_channels=16, num_blocks=1, embedding_dim=16, norm_groups=4)
    calibration = SamplingCalibration(ToyClassifier(world.classifier_path),
                                      [ValidationPrompt("a photo of a belor woman", group="belor", gender="woman")])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[ExportRefiner(str(tmp_path / "refiner")), calibration])
    with pytest.raises(ValueError, match=r"must come before \['ExportRefiner'\]"):
        trainer.fit(module, train_dataloaders=DataLoader([{}], batch_size=None))
    assert not (tmp_path / "refiner").exists()
