"""Every metric of callbacks/metrics.py (and torchmetrics' FID/KID as the callback builds them) gives the same value
on two gloo CPU processes, each fed an uneven strided shard, as on one process fed every image.

Run as a script, this file is the 2-process job: ``python tests/test_metrics_ddp.py OUT CLIP LPIPS``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES, GROUPS, PROMPTS = 13, ("ardan", "belor", "cyran"), ("doctor", "nurse")
# Metrics built from integer counts must agree exactly; float sums may differ in the last bits (summation order).
EXACT_PREFIXES = ("group_match/", "stereotype_rate/", "face_detection_rate/", "kl_to_uniform/", "pairwise_gap/",
                  "low_confidence/")


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    n = NUM_IMAGES
    uncorrected = torch.rand(n, 3, 32, 32, generator=generator)
    return {
        "uncorrected": uncorrected,
        "corrected": (uncorrected + 0.2 * torch.randn(n, 3, 32, 32, generator=generator)).clamp(0, 1),
        "group_probabilities": torch.rand(n, 3, generator=generator).softmax(-1),
        "gender_probabilities": torch.rand(n, 2, generator=generator).softmax(-1),
        "stereotype": torch.rand(n, generator=generator),
        "group_ids": torch.randint(-1, 3, (n,), generator=generator),
        "gender_targets": torch.randint(-1, 2, (n,), generator=generator),
        "prompt_ids": torch.randint(0, 2, (n,), generator=generator),
        "found": torch.rand(n, generator=generator) > 0.25,
        "confidence": 0.9 + 0.1 * torch.rand(n, generator=generator),
        "aesthetic": 5 + torch.randn(n, generator=generator),
        "reference": torch.rand(n, 3, 32, 32, generator=generator),
    }


def metric_values(rank: int, world_size: int, clip_dir: str, lpips_weights: str) -> dict[str, float]:
    """Feed this rank's strided shard (in two updates) to every metric and compute (collective under DDP)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from rsc.callbacks import metrics as m
    from rsc.classifiers.clip import CLIPEncoder

    encoder = CLIPEncoder(clip_dir)
    metrics = {
        "group_match": m.AttributeConsistency(GROUPS, name="group_match"),
        "gender_consistency": m.AttributeConsistency(GROUPS, name="gender_consistency"),
        "stereotype_rate": m.StereotypeRate(GROUPS),
        "faces": m.FaceDetection(GROUPS),
        "distribution": m.DistributionFairness(PROMPTS, num_classes=3, low_confidence=0.4),
        "aesthetic": m.AestheticScore(GROUPS),
        "ssim": m.SSIMPreservation(GROUPS),
        "lpips": m.LPIPSPreservation(GROUPS, backbone_weights=lpips_weights),
        "clip_score": m.PromptFidelity(encoder, GROUPS),
        "fid": FrechetInceptionDistance(feature=encoder, reset_real_features=False),
        "kid": KernelInceptionDistance(feature=encoder, reset_real_features=False, subsets=1, subset_size=NUM_IMAGES),
    }
    data = _data()
    mine = torch.arange(rank, NUM_IMAGES, world_size)
    for part in (mine[: len(mine) // 2], mine[len(mine) // 2 :]):
        d = {key: value[part] for key, value in data.items()}
        prompts = [f"a photo of a {PROMPTS[i]}" for i in d["prompt_ids"].tolist()]
        metrics["group_match"].update(d["group_probabilities"], d["group_ids"], d["group_ids"], d["found"])
        metrics["gender_consistency"].update(d["gender_probabilities"], d["gender_targets"], d["group_ids"], d["found"])
        metrics["stereotype_rate"].update(d["stereotype"], d["group_ids"], d["found"])
        metrics["faces"].update(d["found"], d["confidence"], d["group_ids"])
        metrics["distribution"].update(d["group_probabilities"], d["prompt_ids"], d["found"])
        metrics["aesthetic"].update(d["aesthetic"], d["group_ids"])
        metrics["ssim"].update(d["corrected"], d["uncorrected"], d["group_ids"])
        metrics["lpips"].update(d["corrected"], d["uncorrected"], d["group_ids"])
        metrics["clip_score"].update(d["corrected"], prompts, d["group_ids"])
        for name in ("fid", "kid"):
            metrics[name].update(d["reference"], real=True)
            metrics[name].update(d["corrected"], real=False)
    values: dict[str, float] = {}
    for name, metric in metrics.items():
        result = metric.compute()
        if name == "fid":
            values["fid"] = float(result)
        elif name == "kid":
            values["kid"] = float(result[0])
        else:
            values.update({key: float(value) for key, value in result.items()})
    return values


def _worker(rank: int, world_size: int, port: int, out: str, clip_dir: str, lpips_weights: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        values = metric_values(rank, world_size, clip_dir, lpips_weights)
        Path(out, f"rank{rank}.json").write_text(json.dumps(values))
        # A rank that tears gloo down while its peer still talks to it can abort in C++ ("terminate called
        # without an active exception", seen once in CI): leave together.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_values_equal_single_process_values(tmp_path: Path) -> None:
    import torchvision

    from rsc.testing import save_random_clip

    save_random_clip(tmp_path / "clip", seed=0)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).features.state_dict(), tmp_path / "features.pth")
    # A features-only state dict has keys "0.weight", ...; torchvision's full one "features.0.weight", ...
    state = {f"features.{k}": v for k, v in torch.load(tmp_path / "features.pth", weights_only=True).items()}
    torch.save(state, tmp_path / "alexnet.pth")
    args = [str(tmp_path), str(tmp_path / "clip"), str(tmp_path / "alexnet.pth")]
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__, *args], cwd=REPO, env=environment, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    single = metric_values(0, 1, *args[1:])
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Every rank sees the synced value; KID permutes its features with each process' own RNG before a float32
    # MMD whose terms nearly cancel, so it agrees to ~1e-7 rather than bit for bit.
    assert {k: v for k, v in ranks[0].items() if k != "kid"} == {k: v for k, v in ranks[1].items() if k != "kid"}
    assert ranks[0]["kid"] == pytest.approx(ranks[1]["kid"], abs=1e-6)
    assert set(ranks[0]) == set(single) and len(single) == 56
    for key, expected in single.items():
        got = ranks[0][key]
        if math.isnan(expected):
            assert math.isnan(got), key
        elif key.startswith(EXACT_PREFIXES):
            assert got == expected, (key, got, expected)
        else:
            # CLIP scores are 100 * a float32 cosine whose last bits depend on the batch the image was encoded in.
            tolerance = 1e-4 if key.startswith("clip_score/") else 1e-6
            assert got == pytest.approx(expected, rel=1e-5, abs=tolerance), (key, got, expected)
    # The shards are uneven (7 and 6 images): averaging per-rank ratios would not give these values.
    assert any(not math.isnan(v) and 0 < v < 1 for k, v in single.items() if k.startswith("group_match/"))


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out_dir, clip, lpips = sys.argv[1:4]
    mp.spawn(_worker, args=(2, _free_port(), out_dir, clip, lpips), nprocs=2, join=True)
