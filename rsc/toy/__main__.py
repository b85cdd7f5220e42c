"""``python -m rsc.toy``: build, inspect and sample the toy world.

    python -m rsc.toy build [--out DIR] [--seed N] [--micro] [--force]
    python -m rsc.toy info [--world DIR]
    python -m rsc.toy grid [--world DIR] [--out FILE] [--per-prompt N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rsc.cache import cache_root
from rsc.toy.world import ToyWorld, ToyWorldConfig, build_toy_world, get_toy_world, load_toy_world


def _config(args: argparse.Namespace) -> ToyWorldConfig:
    return ToyWorldConfig.micro(args.seed) if args.micro else ToyWorldConfig.full(args.seed)


def _world(args: argparse.Namespace) -> ToyWorld:
    if args.world:
        return load_toy_world(args.world)
    return get_toy_world(_config(args))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m rsc.toy``."""
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
    build.add_argument("--force", action="store_true", help="rebuild even if a matching world exists")
    build.add_argument("--no-progress", action="store_true", help="stage lines only, no progress bars")

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
    from rsc.toy.evaluate import format_statistics

    print(f"toy world {manifest['fingerprint']} (seed {manifest['seed']}), built in {manifest['build_seconds']:.0f} s")
    print("classifier held-out accuracy:", json.dumps(manifest["statistics"]["classifier_heldout_accuracy"]))
    print("preference pairs:", json.dumps(manifest["sizes"]["preference_pairs"]))
    print(format_statistics(manifest["statistics"], tuple(manifest["config"]["bias"]["targeted_groups"])))


if __name__ == "__main__":
    sys.exit(main())
