"""``python -m rsc.fit --config configs/toy.yaml``: train a refiner with LightningCLI.

Every argument of :class:`rsc.module.RSCorrector` (``--model.*``), of
:class:`rsc.datamodules.preference.PreferenceDataModule` (``--data.*``) and of the
Lightning ``Trainer`` (``--trainer.*``) is configurable from YAML, the command
line or environment variables (``RSC_FIT_MODEL__LEARNING_RATE=...``, below a
``--config`` file and flags in precedence).
``--ckpt_path last`` resumes a killed run from its ``last.ckpt``.
"""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rsc.cli import USER_ERRORS, run_cli
from rsc.datamodules.preference import PreferenceDataModule
from rsc.module import RSCorrector


class RSCLightningCLI(LightningCLI):
    """LightningCLI with the backbone shared between model and data, and a ``--ckpt_path`` to resume."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's backbone to the model's, add ``--ckpt_path``."""
        parser.link_arguments("model.backbone", "data.backbone")
        parser.link_arguments("model.backbone_config", "data.backbone_config")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help='checkpoint to resume from: a path, or "last" for the run\'s last.ckpt',
        )


def main(args: list[str] | None = None) -> RSCLightningCLI:
    """Parse the configuration, build model, data and trainer, and fit; a bad input ends with one line (:mod:`rsc.cli`)."""
    return run_cli(_fit, args, "rsc.fit", USER_ERRORS + (MisconfigurationException,))


def _fit(args: list[str] | None) -> RSCLightningCLI:
    cli = RSCLightningCLI(
        RSCorrector,
        PreferenceDataModule,
        run=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": True, "env_prefix": "RSC_FIT"},
        args=args,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


if __name__ == "__main__":
    main()  # LightningCLI reads sys.argv itself
