"""``python -m rsc.toy``: build, inspect and sample the toy world.

    python -m rsc.toy build [--out DIR] [--seed N] [--micro] [--force]
                            [--targeted GROUP ...] [--stereotype-rate P] [--gender-flip-rate P]
    python -m rsc.toy info [--world DIR]
    python -m rsc.toy compare BUILT REFERENCE [--tolerance 0.05]
    python -m rsc.toy grid [--world DIR] [--out FILE] [--per-prompt N]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from rsc.cache import cache_root
from rsc.cli import run_cli
from rsc.toy.faces import GROUPS
from rsc.toy.manifest import compare_worlds
from rsc.toy.world import ToyWorld, ToyWorldConfig, build_toy_world, get_toy_world, load_toy_world


def _config(args: argparse.Namespace) -> ToyWorldConfig:
    config = ToyWorldConfig.micro(args.seed) if args.micro else ToyWorldConfig.full(args.seed)
    changes = {
        name: value
        for name, value in (
            ("targeted_groups", tuple(args.targeted) if getattr(args, "targeted", None) else None),
            ("stereotype_rate_targeted", getattr(args, "stereotype_rate", None)),
            ("gender_flip_rate_targeted", getattr(args, "gender_flip_rate", None)),
        )
        if value is not None
    }
    if changes:
        config.bias = dataclasses.replace(config.bias, **changes)
    return config


def _world(args: argparse.Namespace) -> ToyWorld:
    if args.world:
        return load_toy_world(args.world)
    return get_toy_world(_config(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rsc.toy``; a bad input ends with one line (:mod:`rsc.cli`)."""
    return run_cli(_main, argv, "rsc.toy")


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsc.toy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build the toy world (reused from the cache unless --force)")
    build.add_argument(
        "--out", type=Path, default=None,
        help=f"destination folder (default: the world shipped in rsc/toy/world if it matches, else {cache_root()}/toy_world-<fingerprint>)",
    )
    for sub in (build,):
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--micro", action="store_true", help="the seconds-to-build variant used by unit tests")
        sub.add_argument("--targeted", nargs="+", choices=GROUPS, default=None,
                         help="groups the planted stereotype targets (default: belor dovek)")
        sub.add_argument("--stereotype-rate", type=float, default=None,
                         help="share of the targeted groups' training images with the stereotype (default 0.85)")
        sub.add_argument("--gender-flip-rate", type=float, default=None,
                         help="share of the targeted groups' samples showing the wrong gender (default 0.4; "
                              "the captions flip more often, see BiasSpec.caption_flip_rate_targeted)")
    build.add_argument("--force", action="store_true", help="rebuild even if a matching world exists")
    build.add_argument("--no-progress", action="store_true", help="stage lines only, no progress bars")

    compare = commands.add_parser("compare", help="compare a built world with a reference world (exit 1 if they disagree)")
    compare.add_argument("built", type=Path)
    compare.add_argument("reference", type=Path)
    compare.add_argument("--tolerance", type=float, default=0.05, help="largest accepted difference of a per-prompt rate")
    info = commands.add_parser("info", help="print a world's manifest summary")
    grid = commands.add_parser("grid", help="sample every toy prompt and save a labelled image grid")
    for sub in (info, grid):
        sub.add_argument("--world", type=Path, default=None, help="a built world folder (default: the shipped/cached full world)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--micro", action="store_true")
    grid.add_argument("--out", type=Path, default=Path("toy_samples.png"))
    grid.add_argument("--per-prompt", type=int, default=8)
    grid.add_argument("--first-seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "build":
        config = _config(args)
        if args.out is None and not args.force:
            world = get_toy_world(config, progress=not args.no_progress)  # shipped, cached or built
        else:
            out = args.out or cache_root() / f"toy_world-{config.fingerprint()}"
            world = build_toy_world(out, config, force=args.force, progress=not args.no_progress)
        print(f"toy world at {world.path}")
        _print_summary(world.manifest)
        return 0
    if args.command == "compare":
        ok, lines = compare_worlds(load_toy_world(args.built), load_toy_world(args.reference), args.tolerance)
        print("\n".join(lines))
        return 0 if ok else 1
    world = _world(args)
    if args.command == "info":
        _print_summary(world.manifest)
        return 0
    from rsc.toy.evaluate import sample_toy_prompts, save_prompt_grid

    config = world.manifest["config"]
    samples = sample_toy_prompts(
        world.load_backbone(), world.load_classifier(), args.per_prompt, first_seed=args.first_seed,
        steps=config["sampling_steps"], guidance_scale=config["guidance_scale"],
    )
    save_prompt_grid(samples, args.out, per_prompt=args.per_prompt)
    print(f"saved {args.out}")
    return 0


def _print_summary(manifest: dict) -> None:
    from rsc.toy.manifest import format_manifest

    print(format_manifest(manifest))


if __name__ == "__main__":
    sys.exit(main())
