"""FairnessValidation on the toy world: its numbers equal the toy efficacy report's for the same refiner and seeds."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from rsc.callbacks.fairness import FairnessValidation, ValidationPrompt
from rsc.classifiers import ToyClassifier
from rsc.module import RSCorrector
from rsc.toy.data import toy_prompts
from rsc.toy.evaluate import efficacy_report, sample_toy_prompts
from rsc.toy.faces import GROUPS
from rsc.toy.world import SHIPPED_WORLD_DIR, load_toy_world

SEEDS, STEPS, GUIDANCE = 4, 10, 7.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world():  # noqa: ANN201
    return load_toy_world(SHIPPED_WORLD_DIR)


@pytest.fixture(scope="module")
def module(world) -> RSCorrector:  # noqa: ANN001
    module = RSCorrector(backbone=str(world.sd_path), hidden_channels=16, num_blocks=1, embedding_dim=16,
                         norm_groups=4, correction_window=(0.0, 0.5), strength=1.0)
    # A refiner that visibly changes the samples (a trained one's output layer is no longer zero).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in (module.refiner.conv_out.weight, module.refiner.conv_out.bias):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module


def _validation_batches(module: RSCorrector) -> DataLoader:
    """One batch in the preference datamodule's format, so the module's own validation_step runs."""
    generator = torch.Generator().manual_seed(1)
    cond = module.ldm.encode_prompt(["a photo of a belor woman"] * 2, do_classifier_free_guidance=False).cond
    shape = (2, module.ldm.latent_channels, 16, 16)
    batch = {"anti_stereotypical_latents": torch.randn(shape, generator=generator),
             "stereotypical_latents": torch.randn(shape, generator=generator),
             "prompt_embeds": cond, "index": torch.tensor([0, 1])}
    return DataLoader([batch], batch_size=None)


def _toy_callback(world, **overrides) -> FairnessValidation:  # noqa: ANN001
    prompts = [ValidationPrompt(prompt, group=group, gender=gender) for prompt, group, gender in toy_prompts()]
    kwargs = dict(classifier=ToyClassifier(world.classifier_path), prompts=prompts, seeds=SEEDS, steps=STEPS,
                  guidance_scale=GUIDANCE, batch_size=64, lpips_backbone_weights=None, grid_images_per_group=4)
    return FairnessValidation(**{**kwargs, **overrides})


def test_callback_numbers_equal_the_toy_efficacy_report(world, module: RSCorrector, tmp_path: Path) -> None:  # noqa: ANN001
    callback = _toy_callback(world)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    batches = _validation_batches(module)
    trainer.validate(module, dataloaders=batches, verbose=False)
    first, first_timing = dict(callback.last_values), dict(callback.last_timing)

    classifier = world.load_classifier()
    kwargs = dict(samples_per_prompt=SEEDS, steps=STEPS, guidance_scale=GUIDANCE, progress=False)
    uncorrected = sample_toy_prompts(module.ldm, classifier, **kwargs)
    corrected = sample_toy_prompts(module.ldm, classifier, correction=module.correction(),
                                   correction_window=tuple(module.hparams.correction_window), **kwargs)
    report = efficacy_report(uncorrected, corrected, world.targeted_groups)
    for group, row in report["per_group"].items():
        for metric in ("stereotype_rate", "gender_consistency", "group_match"):
            before, after = row[metric]
            assert first[f"val/{metric}_uncorrected/{group}"] == pytest.approx(before, abs=1e-12), (metric, group)
            assert first[f"val/{metric}/{group}"] == pytest.approx(after, abs=1e-12), (metric, group)
        assert first[f"val/ssim/{group}"] == pytest.approx(row["ssim"], abs=1e-5), group
    # The refiner really changed the images and the classifier's verdicts, so equality is not trivial.
    changed = [(g, m) for g in GROUPS for m in ("stereotype_rate", "gender_consistency")
               if first[f"val/{m}/{g}"] != first[f"val/{m}_uncorrected/{g}"]]
    assert changed, "the test refiner must change some verdicts"
    assert max(first[f"val/ssim/{g}"] for g in GROUPS) < 0.99
    # Pooled and gap summaries follow from the per-group values (equal group sizes here).
    rates = [first[f"val/stereotype_rate/{g}"] for g in GROUPS]
    assert first["val/stereotype_rate/all"] == pytest.approx(np.mean(rates))
    assert first["val/stereotype_rate/gap"] == pytest.approx(max(rates) - min(rates))

    # Logged through Lightning, grid saved and sent to TensorBoard.
    assert float(trainer.callback_metrics["val/gender_consistency/belor"]) == pytest.approx(first["val/gender_consistency/belor"])
    grids = sorted((tmp_path / "fairness").glob("*.png"))
    assert len(grids) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert "val/fairness_grid" in events.Tags()["images"]

    # Second run: the cached uncorrected baseline is reused (not resampled) and nothing changes.
    trainer.validate(module, dataloaders=batches, verbose=False)
    assert "uncorrected_s" in first_timing and "uncorrected_s" not in callback.last_timing
    assert callback.last_values == first


def test_every_n_validation_epochs_and_config_errors(world) -> None:  # noqa: ANN001
    callback = _toy_callback(world, every_n_val_epochs=3)
    calls: list[int] = []
    callback.run = lambda trainer, module: calls.append(callback._validation_runs) or {}  # type: ignore[method-assign]

    class _Trainer:
        sanity_checking = False
        global_step = 0

    class _Module:
        def log_dict(self, values: dict, sync_dist: bool) -> None:
            pass

    for _ in range(7):
        callback.on_validation_epoch_end(_Trainer(), _Module())  # type: ignore[arg-type]
    assert calls == [3, 6]

    with pytest.raises(ValueError, match=r"prompts\[0\].group='elf'"):
        _toy_callback(world, prompts=[ValidationPrompt("a photo of an elf", group="elf")])
    with pytest.raises(ValueError, match="gender_attribute='sex' is not an attribute of ToyClassifier"):
        _toy_callback(world, gender_attribute="sex")


def test_cadence_continues_across_a_resume(world, tmp_path: Path) -> None:  # noqa: ANN001
    """The validation-run counter is in the checkpoint: a run resumed after 2 of its validations measures at the
    3rd (every_n_val_epochs=3), as an uninterrupted one does, not at the 5th."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from rsc.callbacks.checkpoint import ResumableCheckpoint

    def fit(max_epochs: int, ckpt_path: str | None) -> list[int]:
        callback = _toy_callback(world, every_n_val_epochs=3)
        measured: list[int] = []
        callback.run = lambda trainer, module: measured.append(trainer.current_epoch) or {}  # type: ignore[method-assign]
        trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False,
                            callbacks=[callback, ResumableCheckpoint(dirpath=str(tmp_path / "checkpoints"))])
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return measured

    assert fit(2, None) == []  # validations 1 and 2
    assert fit(4, str(tmp_path / "checkpoints" / "last.ckpt")) == [2]  # validation 3 is epoch 2's


def test_a_step_cadence_measures_the_final_weights_and_an_epoch_cadence_warns(world) -> None:  # noqa: ANN001
    """With 3 batches per epoch and 8 steps, validating every 4 steps (every 2nd run measured) measures at step 8,
    the last; validating at epoch ends measures at step 6 and the callback says its values are stale."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    def fit(**cadence: object) -> tuple[FairnessValidation, list[int], int]:
        callback = _toy_callback(world, every_n_val_epochs=cadence.pop("every_n_val_epochs"))
        measured: list[int] = []
        callback.run = lambda trainer, module: measured.append(trainer.global_step) or {}  # type: ignore[method-assign]
        trainer = L.Trainer(accelerator="cpu", max_steps=8, limit_train_batches=3, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, callbacks=[callback], **cadence)
        trainer.fit(BoringModel())
        return callback, measured, trainer.global_step

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="FairnessValidation last measured")
        callback, measured, last = fit(every_n_val_epochs=2, check_val_every_n_epoch=None, val_check_interval=4)
    assert measured == [8] and callback.last_step == last == 8
    with pytest.warns(UserWarning, match="FairnessValidation last measured at step 6, the fit ended at step 8"):
        callback, measured, last = fit(every_n_val_epochs=1, check_val_every_n_epoch=1)
    assert measured == [3, 6] and callback.last_step == 6


def test_shards_cover_every_item_once(world) -> None:  # noqa: ANN001
    callback = _toy_callback(world, prompts=[ValidationPrompt("a photo of a woman", gender="woman", name="woman"),
                                             *(ValidationPrompt(p, group=g, gender=s) for p, g, s in toy_prompts()[:2])],
                             seeds=[5, 6, 7])
    single = callback._shard(0, 1)
    items = set(zip(single.prompts, single.seeds))
    assert len(items) == 9
    for world_size in (2, 4, 16):
        shards = [callback._shard(rank, world_size) for rank in range(world_size)]
        pairs = [pair for shard in shards for pair in zip(shard.prompts, shard.seeds)]
        assert sorted(pairs) == sorted(items)  # no duplicates, nothing missing, no padding
    assert single.neutral_ids.tolist() == [0, 0, 0, -1, -1, -1, -1, -1, -1]
    assert single.group_ids.tolist() == [-1, -1, -1, 0, 0, 0, 0, 0, 0]


def _demo_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **init_args: object) -> FairnessValidation:
    """The FairnessValidation that LightningCLI builds from configs/toy.yaml, with ``init_args`` added to its YAML."""
    import yaml

    from rsc.datamodules.preference import PreferenceDataModule
    from rsc.fit import RSCLightningCLI

    monkeypatch.chdir(REPO)  # the config's paths are relative to the repository, as in the demo
    config = yaml.safe_load((REPO / "configs" / "toy.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("Checkpoint")]
    config["trainer"].update(logger=False, default_root_dir=str(tmp_path))
    for entry in config["trainer"]["callbacks"]:
        if entry["class_path"].endswith("FairnessValidation"):
            entry["init_args"].update(init_args)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = RSCLightningCLI(RSCorrector, PreferenceDataModule, run=False, args=["--config", str(tmp_path / "config.yaml")])
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, FairnessValidation)]
    return callback


def test_the_demo_config_builds_the_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    callback = _demo_callback(tmp_path, monkeypatch)
    assert isinstance(callback.classifier, ToyClassifier) and callback.seeds == list(range(8)) and callback.every_n_val_epochs == 2
    assert [(p.prompt, p.group, p.gender) for p in callback.prompts] == toy_prompts()
    assert callback.groups == GROUPS and callback.neutral == []


def test_the_toy_quality_judge_is_an_aesthetic_predictor_in_yaml_and_logs_per_group(
    world, module: RSCorrector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    from rsc.classifiers import ToyFacialQuality
    from rsc.toy.quality import ToyQualityJudge

    torch.manual_seed(0)
    judge = ToyQualityJudge()  # untrained: this test is about the wiring, tests/test_toy_quality.py about the scores
    judge.save_pretrained(tmp_path / "judge")
    aesthetic = {"class_path": "rsc.classifiers.ToyFacialQuality", "init_args": {"path": str(tmp_path / "judge")}}
    built = _demo_callback(tmp_path, monkeypatch, aesthetic=aesthetic)
    assert isinstance(built.aesthetic, ToyFacialQuality)
    assert torch.equal(built.aesthetic.model.head.weight, judge.head.weight)

    prompts = [ValidationPrompt(p, group=g, gender=s) for p, g, s in toy_prompts()[:4]]
    callback = _toy_callback(world, prompts=prompts, seeds=2, steps=2, aesthetic=built.aesthetic)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=_validation_batches(module), verbose=False)
    values = callback.last_values
    for group in ("ardan", "belor"):
        for variant in ("", "_uncorrected"):
            assert 0 <= values[f"val/aesthetic{variant}/{group}"] <= 10, (group, variant)
    assert math.isnan(values["val/aesthetic/cyran"])  # no prompt of that group


def test_every_optional_metric_runs_and_faceless_images_are_counted(world, module: RSCorrector, tmp_path: Path) -> None:  # noqa: ANN001
    from PIL import Image

    from rsc.classifiers import LaionAestheticPredictor, MTCNNFaces
    from rsc.testing import save_random_clip

    save_random_clip(tmp_path / "clip", seed=0)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(32, 1).state_dict(), tmp_path / "head.pth")
    (tmp_path / "reference").mkdir()
    for index in range(4):
        Image.fromarray(np.full((64, 64, 3), 40 * index, dtype=np.uint8)).save(tmp_path / "reference" / f"{index}.png")
    prompts = [ValidationPrompt(p, group=g, gender=s) for p, g, s in toy_prompts()[:4]]
    prompts.append(ValidationPrompt("a photo of a person", name="person"))
    callback = _toy_callback(
        world, prompts=prompts, seeds=2, steps=2, faces=MTCNNFaces(min_face_size=12, crop_size=64, min_confidence=1.0),
        aesthetic=LaionAestheticPredictor(tmp_path / "clip", tmp_path / "head.pth"), clip_model=str(tmp_path / "clip"),
        fid_reference=str(tmp_path / "reference"), kid_subset_size=4,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=_validation_batches(module), verbose=False)
    values = callback.last_values
    for key in ("val/clip_score/ardan", "val/aesthetic/belor", "val/face_detection_rate/all", "val/face_confidence/gap",
                "val/kl_to_uniform/person", "val/fid", "val/kid", "val/fid_uncorrected", "val/kid_uncorrected",
                "val/clip_score_uncorrected/all", "val/ssim/ardan"):
        assert key in values, key
    assert "val/ssim_uncorrected/ardan" not in values and "val/lpips/ardan" not in values
    # No 2-step toy sample holds a face MTCNN is certain of (min_confidence 1.0; the toy world's v3 faces are
    # face-like enough that MTCNN finds one in 10 at its default 0.9): all 10 images are counted as faceless (rate 0, not NaN)
    # and left out of the attribute metrics (NaN), not silently dropped from the denominators.
    for variant in ("", "_uncorrected"):
        assert values[f"val/face_detection_rate{variant}/all"] == 0.0
        assert values[f"val/face_detection_rate{variant}/ardan"] == 0.0
        for metric in ("group_match", "gender_consistency", "stereotype_rate", "low_confidence"):
            key = f"val/{metric}{variant}/" + ("person" if metric == "low_confidence" else "all")
            assert math.isnan(values[key]), key
    assert values["val/clip_score/all"] >= 0 and math.isfinite(values["val/fid"])
