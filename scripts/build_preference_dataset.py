#!/usr/bin/env python
"""Build a preference dataset from a real Stable Diffusion and a labelled folder of face photos.

Stereotypical images (x_l) are samples of the frozen SD for templated prompts;
anti-stereotypical images (x_w) are reference photos whose labels match the
prompt's group (and gender). MTCNN (facenet-pytorch, weights bundled) drops
images without exactly one confident face. The result is a ``DatasetDict``
(``train``/``validation``, columns of ``datamodules/schema.py``) saved with
``save_to_disk``, atomically, plus ``build_report.json``; train on it with
``PreferenceDataModule(dataset=OUT, backbone=BACKBONE)``.

The logic lives in ``datamodules/builder.py``; this is its command line.

Reference folder (FairFace-style)::

    references/
      labels.csv          # file_name,group,gender   (paths relative to this folder)
      train/1.jpg
      ...

Config file (JSON or YAML; every key optional, command-line flags override it).
Group and gender values must be written exactly as in ``labels.csv``;
``prompt_words`` says how a label is phrased in the prompt. An example for
FairFace's labels::

    template: "a photo of a {group} {gender}"
    groups: ["White", "Black", "East Asian", "Southeast Asian", "Indian", "Middle Eastern", "Latino_Hispanic"]
    genders: ["Female", "Male"]
    prompt_words: {"Female": "woman", "Male": "man", "Latino_Hispanic": "Latino"}
    samples_per_prompt: 64
    steps: 30
    guidance_scale: 7.5
    validation_fraction: 0.1

or, with professions (pairs are then matched by group only)::

    template: "a photo of a {group} {profession}"
    groups: ["East Asian", "Indian"]
    professions: ["doctor", "teacher", "chef"]

Example::

    python scripts/build_preference_dataset.py \\
        --backbone stable-diffusion-v1-5/stable-diffusion-v1-5 --dtype float16 --device cuda \\
        --config prompts.yaml --references /data/fairface --out /data/preferences-sd15

Without a config file, give the attributes on the command line
(``--groups GROUP_A GROUP_B --genders GENDER_A GENDER_B``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rsc.classifiers.faces import FacePolicy, MTCNNFaceDetector
from rsc.datamodules import builder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--backbone", required=True, help="SD Hub id, diffusers folder or single-file checkpoint")
    parser.add_argument(
        "--backbone-config", help="for single-file checkpoints: diffusers folder or Hub id of the architecture"
    )
    parser.add_argument("--references", required=True, type=Path, help="folder of reference photos with the labels CSV")
    parser.add_argument("--labels-file", default="labels.csv", help="labels CSV inside --references")
    parser.add_argument("--out", required=True, type=Path, help="output DatasetDict folder (save_to_disk layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--config", type=Path, help="JSON/YAML file with BuildConfig settings")
    parser.add_argument("--template", help='prompt template, e.g. "a photo of a {group} {gender}"')
    parser.add_argument("--groups", nargs="+", help="group labels as written in the labels CSV")
    parser.add_argument("--genders", nargs="+", help="gender labels as written in the labels CSV")
    parser.add_argument("--professions", nargs="+", help="words for {profession}")
    parser.add_argument("--prompt-word", action="append", default=[], metavar="LABEL=WORDS",
                        help="how a label is phrased in prompts (repeatable), e.g. GENDER_LABEL=woman")
    parser.add_argument("--samples-per-prompt", type=int)
    parser.add_argument("--first-seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--scheduler", help="diffusers scheduler class name (default: the model's)")
    parser.add_argument("--validation-fraction", type=float)
    parser.add_argument("--seed", type=int, help="seed of the pairing and of the split")
    parser.add_argument("--face-filter", choices=("mtcnn", "none"), default="mtcnn",
                        help="'none' keeps every image (for already filtered data)")
    parser.add_argument("--face-policy", choices=("exactly_one", "at_least_one"), default="exactly_one")
    parser.add_argument("--min-face-confidence", type=float, default=FacePolicy.min_confidence)
    parser.add_argument("--min-face-size", type=int, default=20, help="smallest face side in pixels for MTCNN")
    parser.add_argument("--crop-faces", action="store_true", help="crop both sides to the detected face")
    parser.add_argument("--crop-margin", type=float, default=FacePolicy.margin)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")  # rsc.backbone.DTYPES
    parser.add_argument("--batch-size", type=int, default=8, help="images per sampling batch")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> builder.BuildConfig:
    """The config file's settings with the command-line overrides applied."""
    data = builder.BuildConfig.from_file(args.config).to_dict() if args.config else {}
    overrides = {
        "template": args.template,
        "groups": args.groups,
        "genders": args.genders,
        "professions": args.professions,
        "samples_per_prompt": args.samples_per_prompt,
        "first_seed": args.first_seed,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "scheduler": args.scheduler,
        "validation_fraction": args.validation_fraction,
        "seed": args.seed,
    }
    data.update({key: value for key, value in overrides.items() if value is not None})
    for item in args.prompt_word:
        label, separator, words = item.partition("=")
        if not separator or not label or not words:
            raise ValueError(f"--prompt-word expects LABEL=WORDS, got {item!r}")
        data.setdefault("prompt_words", {})[label] = words
    return builder.BuildConfig.from_dict(data, origin=str(args.config or "command line"))


def main(argv: list[str] | None = None) -> int:
    """Run the build; print the report as JSON."""
    args = parse_args(argv)
    import torch

    from rsc.backbone import DTYPES, FrozenLDM

    config = config_from_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ldm = FrozenLDM.from_pretrained(
        args.backbone, config=args.backbone_config, dtype=DTYPES[args.dtype], device=device
    )
    face_filter = None
    if args.face_filter == "mtcnn":
        face_filter = builder.FaceFilter(
            MTCNNFaceDetector(device=device, min_face_size=args.min_face_size),
            min_confidence=args.min_face_confidence,
            policy=args.face_policy,
            crop=args.crop_faces,
            crop_margin=args.crop_margin,
        )
    report = builder.build_preference_dataset(
        ldm,
        config,
        args.references,
        args.out,
        face_filter,
        labels_file=args.labels_file,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
