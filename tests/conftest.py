"""Shared fixtures: offline mode, a tiny random SD saved in diffusers format."""

from __future__ import annotations

import os

# Tests must never reach a hub: an accidental download fails loudly instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from rsc.testing import RandomSDSpec, build_random_sd  # noqa: E402

# Tests check behaviour, not speed (speed goals live in scripts/bench*.py): no per-example deadline, which an
# example misses when the other xdist worker loads the cores (one that takes 5 ms took 260 ms in a CI run).
settings.register_profile("rsc", deadline=None)
settings.load_profile("rsc")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random epsilon-prediction SD saved with ``save_pretrained`` (loaded back like a Hub id's snapshot)."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    build_random_sd(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random v-prediction SD (the SD 2.x parameterisation)."""
    folder = tmp_path_factory.mktemp("tiny_sd_v")
    build_random_sd(RandomSDSpec(prediction_type="v_prediction"), seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _fixed_threads() -> None:
    # Under pytest-xdist the cores are shared among the workers: more threads than cores only thrash.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(scope="session")
def tiny_prefs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``save_to_disk`` preference dataset of 24 train / 8 validation pairs of 64x64 toy renders."""
    from fitting import build_preferences

    return build_preferences(tmp_path_factory.mktemp("tiny_prefs") / "prefs")


@pytest.fixture(scope="session")
def micro_world(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The micro toy world (``ToyWorldConfig.micro()``), built once per session; tests only read it."""
    from rsc.toy.world import ToyWorldConfig, build_toy_world

    return build_toy_world(tmp_path_factory.mktemp("worlds") / "micro", ToyWorldConfig.micro(), progress=False)
