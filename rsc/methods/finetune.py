"""``finetune_dpo``: the fine-tuning family, a Diffusion-DPO LoRA (:class:`rsc.dpo.DiffusionDPO`) on the same pairs."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from rsc.methods.base import Method, MethodContext, SamplingSettings, register

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rsc.callbacks.measures import ValidationPrompt
    from rsc.dpo import DiffusionDPO


def _folder_identity(path: Path) -> list[tuple[str, int]]:
    """Names and sizes of a dataset folder's files (a changed dataset retrains the adapter)."""
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


@register
class FinetuneDPO(Method):
    """A LoRA trained with the Diffusion-DPO loss on ``dataset`` for ``steps`` steps, cached by its configuration.

    The adapter is trained once per (backbone, dataset, options) and saved under
    ``<cache_dir>/dpo-<hash>/lora.safetensors``; later runs load it. Give it the refiner's step
    budget (the toy demo: 1536 steps of 16 pairs) for a fair comparison. ``steps: 0`` is the
    untrained (zero) adapter, whose images are the ``none`` images.

    Args:
        dataset: The preference dataset (the refiner's, e.g. ``rsc/toy/world/preferences``).
        steps: Optimisation steps.
        batch_size: Pairs per step.
        rank: LoRA rank.
        alpha: LoRA alpha.
        beta: Diffusion-DPO inverse temperature.
        learning_rate: AdamW learning rate.
        seed: Seed of training.
        cache_dir: Where adapters (and the datamodule's latents) are cached; default ``$RSC_CACHE`` or ``~/.cache/rsc``.
    """

    name = "finetune_dpo"

    def __init__(self, dataset: str = "rsc/toy/world/preferences", steps: int = 1536, batch_size: int = 16,
                 rank: int = 4, alpha: float = 4.0, beta: float = 2500.0, learning_rate: float = 1e-4, seed: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        if steps < 0 or batch_size < 1:
            raise ValueError(f"method finetune_dpo: steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
        self.dataset, self.steps, self.batch_size = dataset, int(steps), int(batch_size)
        self.hyper = {"rank": rank, "alpha": alpha, "beta": beta, "learning_rate": learning_rate, "seed": seed}
        self.cache_dir = cache_dir
        self._module: DiffusionDPO | None = None

    def options(self) -> dict[str, Any]:
        """Training options (the dataset by its files, not its path)."""
        return {"steps": self.steps, "batch_size": self.batch_size, **self.hyper}

    def setup(self, context: MethodContext) -> None:
        """Load the cached adapter, or train and cache it."""
        from filelock import FileLock
        from safetensors.torch import load_file, save_file

        from rsc.atomic import atomic_path
        from rsc.cache import cache_root
        from rsc.dpo import DiffusionDPO
        from rsc.identity import BackboneConfigs

        super().setup(context)
        ldm = context.ldm
        dataset = Path(self.dataset)
        if self.steps and not dataset.is_dir():
            raise FileNotFoundError(f"method finetune_dpo: dataset={self.dataset!r} is not a folder (a preference dataset)")
        key = {"backbone": BackboneConfigs.from_components(ldm.unet, ldm.text_encoder, ldm.scheduler).label,
               "dataset": _folder_identity(dataset) if self.steps else None, **self.options()}
        self.digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        module = DiffusionDPO(ldm, **self.hyper)
        weights = (Path(self.cache_dir) if self.cache_dir else cache_root()) / f"dpo-{self.digest}" / "lora.safetensors"
        names = [name for name, p in module.unet.named_parameters() if p.requires_grad]
        weights.parent.mkdir(parents=True, exist_ok=True)
        # Processes evaluating together (torchrun) set up at once: the first trains, the others wait and load.
        with FileLock(str(weights.parent / ".lock")):
            if weights.is_file():
                state = load_file(str(weights))
                module.unet.load_state_dict(state, strict=False)
            elif self.steps:
                start = time.perf_counter()
                self._train(module, context)
                parameters = dict(module.unet.named_parameters())
                with atomic_path(weights) as temporary:
                    save_file({name: parameters[name].detach().cpu().contiguous() for name in names}, str(temporary))
                log.info("finetune_dpo: trained the adapter (%d steps) in %.0f s, cached in %s", self.steps,
                         time.perf_counter() - start, weights.parent)
        self._module = module

    def _train(self, module: DiffusionDPO, context: MethodContext) -> None:
        import lightning as L
        from lightning.fabric.plugins.environments import LightningEnvironment

        from rsc.datamodules.preference import PreferenceDataModule

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Lightning would run collectives on the caller's process group, which the other ranks are not in.
            raise RuntimeError(
                "method finetune_dpo: its adapter is not trained yet, and torch.distributed is initialised; set the "
                "methods up before joining the process group (python -m rsc.evaluate does), or train it in one process"
            )
        source = context.ldm.source
        if source is None:
            raise ValueError("method finetune_dpo needs a backbone loaded from a path or Hub id (to encode the pairs)")
        data = PreferenceDataModule(self.dataset, source, batch_size=self.batch_size, cache_dir=self.cache_dir,
                                    progress=False, seed=self.hyper["seed"])
        # LightningEnvironment: one training process even when launched by torchrun for the evaluation.
        trainer = L.Trainer(max_steps=self.steps, accelerator=context.ldm.device.type, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=True, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, plugins=[LightningEnvironment()])
        trainer.fit(module, datamodule=data)
        module.eval()

    def identity(self) -> dict[str, Any]:
        """Options and the hash of the adapter's configuration (backbone, dataset files, options)."""
        return {**super().identity(), "adapter": self.digest}

    def unets(self) -> list[Any]:
        """The adapted copy of the UNet."""
        if self._module is None:
            raise RuntimeError("method finetune_dpo: call setup() first")
        return [self._module.unet]

    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images of the fine-tuned model."""
        from rsc.sampling import sample

        if self._module is None:
            raise RuntimeError("method finetune_dpo: call setup() first")
        with torch.no_grad():
            return sample(self._module.adapted_ldm(), [p.prompt for p in prompts], list(seeds), steps=sampling.steps,
                          guidance_scale=sampling.guidance_scale, scheduler=sampling.scheduler,
                          batch_size=max(1, len(prompts)), progress=False).images
