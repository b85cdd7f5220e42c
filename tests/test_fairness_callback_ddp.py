"""FairnessValidation under 2-process CPU DDP reports what one process reports (strided shards, collective compute).

Run as a script, this file is one Lightning DDP job: ``python tests/test_fairness_callback_ddp.py OUT DEVICES``
(Lightning starts the second rank by running the same command again).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script, the repository's packages must be importable on every rank


def validate(out: str, devices: int) -> dict[str, float]:
    """Run ``trainer.validate`` with the toy callback on ``devices`` CPU processes; write each rank's values."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rsc.callbacks.fairness import FairnessValidation, ValidationPrompt
    from rsc.classifiers import ToyClassifier
    from rsc.module import RSCorrector
    from rsc.toy.data import toy_prompts
    from rsc.toy.world import SHIPPED_WORLD_DIR

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the refiner's hidden layers are initialised from the global RNG: same refiner in every run
    module = RSCorrector(backbone=str(SHIPPED_WORLD_DIR / "sd"), hidden_channels=16, num_blocks=1, embedding_dim=16,
                         norm_groups=4, correction_window=(0.0, 0.5))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in (module.refiner.conv_out.weight, module.refiner.conv_out.bias):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    prompts = [ValidationPrompt(p, group=g, gender=s) for p, g, s in toy_prompts()]
    prompts.append(ValidationPrompt("a photo of a woman", gender="woman", name="woman"))  # names no group
    callback = FairnessValidation(ToyClassifier(SHIPPED_WORLD_DIR / "classifier"), prompts, seeds=3, steps=6,
                                  guidance_scale=7.0, lpips_backbone_weights=None, grid_images_per_group=2)
    cond = module.ldm.encode_prompt(["a photo of a belor woman"] * 2, do_classifier_free_guidance=False).cond
    latents = torch.randn(2, module.ldm.latent_channels, 16, 16, generator=generator)
    batch = {"anti_stereotypical_latents": latents, "stereotypical_latents": latents.flip(0),
             "prompt_embeds": cond, "index": torch.tensor([0, 1])}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        default_root_dir=out, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[callback])
    trainer.validate(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    Path(out, f"rank{trainer.global_rank}-of-{devices}.json").write_text(json.dumps(callback.last_values))
    return callback.last_values


@pytest.mark.slow
def test_callback_under_ddp_equals_one_process(tmp_path: Path) -> None:
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__, str(tmp_path), "2"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    single = validate(str(tmp_path), 1)
    ranks = [json.loads((tmp_path / f"rank{rank}-of-2.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == set(single)
    assert "val/kl_to_uniform/woman" in single and "val/stereotype_rate/belor" in single
    for key, expected in single.items():
        got = ranks[0][key]
        if math.isnan(expected):
            assert math.isnan(got), key
        elif key.startswith("val/ssim"):
            assert got == pytest.approx(expected, abs=1e-5), key  # float sums in another order
        else:
            assert got == expected, (key, got, expected)  # ratios of integer counts
    assert list((tmp_path / "fairness").glob("*.png")), "rank 0 saves the grid"


if __name__ == "__main__":
    validate(sys.argv[1], int(sys.argv[2]))
