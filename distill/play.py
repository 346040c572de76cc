"""hivegym-play's parts: run a pulled checkpoint in its environment (no hivemind, no coordinator); the command
is in cli.py. Heavy modules load after argparse.

    hivegym-play policies/CartPole-v1-tiny.json --episodes 20 --record tiny.gif
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class PlayError(Exception):
    """Ends the program with a one-line message and exit status 1."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hivegym-play", description="Run a pulled hivegym checkpoint and print "
                                     "the mean and std of its return as one JSON line.")
    parser.add_argument("path", type=Path, metavar="PATH",
                        help="NAME.json, NAME.pt or NAME of a pulled package, or RUN_DIR/checkpoints/NAME.json")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="episode i starts from reset(seed=SEED + i) (default 0)")
    parser.add_argument("--key", metavar="KEY|JOIN", default=None,
                        help="also check the signature: the coordinator's key, or its join string HOST:PORT#KEY")
    parser.add_argument("--record", type=Path, metavar="FILE.gif", default=None,
                        help="write a GIF of the first episode (needs the 'play' extra)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.seed < 0:
        parser.error("--episodes must be >= 1 and --seed >= 0")
    if args.record is not None and args.record.suffix.lower() != ".gif":
        parser.error("--record writes GIF files only: give a FILE.gif")
    return args


def package_paths(path: Path) -> tuple[Path, Path]:
    stem = path.with_suffix("") if path.suffix in (".json", ".pt") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".pt")


def load(path: Path, key: str | None):
    """(manifest, actor) of a package after checking its weights' sha256, and its signature if a key is given."""
    from hivegym.distill.actor import Actor, load_weights
    from hivegym.protocol.checkpoint import (CheckpointError, parse_manifest, verify_signature, verify_weights,
                                             weights_name)
    from hivegym.protocol.identity import IdentityError, decode_key, parse_join

    manifest_path, weights_path = package_paths(path)
    try:
        manifest = parse_manifest(manifest_path.read_bytes())
        if key is not None:
            verify_signature(manifest, parse_join(key).public_key if "#" in key else decode_key(key))
        if not weights_path.exists():  # a package in a run directory: its weights are named by their hash
            weights_path = weights_path.with_name(weights_name(manifest["name"], manifest["weights"]["sha256"]))
        verify_weights(manifest, weights_path)
        actor = Actor.from_architecture(manifest["architecture"])
        return manifest, load_weights(actor, weights_path.read_bytes())
    except OSError as e:
        raise PlayError(f"cannot read {e.filename}: {e.strerror}") from None
    except (CheckpointError, IdentityError) as e:
        raise PlayError(f"refused {manifest_path}: {e}") from None


def check_env(manifest: dict, actor) -> None:
    """The manifest's env must exist here and fit the network's input and output."""
    import gymnasium as gym

    from hivegym.protocol.policy import space_dims

    try:
        env = gym.make(manifest["env_id"])
        dims = space_dims(env)
        env.close()
    except (gym.error.Error, ValueError, ImportError) as e:
        raise PlayError(f"cannot make {manifest['env_id'][:80]!r} here: {e}") from None
    if dims != (actor.obs_dim, actor.act_dim, actor.discrete):
        raise PlayError(f"{manifest['env_id']} has (obs_dim, act_dim, discrete) = {dims}; the network was built "
                        f"for {(actor.obs_dim, actor.act_dim, actor.discrete)}")


def record(actor, env_id: str, seed: int, path: Path) -> int:
    """Write one deterministic episode as a GIF; returns its frame count."""
    import gymnasium as gym
    import numpy as np
    import torch

    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # rgb arrays need no display; SDL complains without one
    try:
        from PIL import Image

        env = gym.make(env_id, render_mode="rgb_array")
        obs, _ = env.reset(seed=seed)
        frames = [env.render()]
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        raise PlayError(f"--record needs the 'play' extra: pip install 'hivegym[play]' ({e})") from None
    if not isinstance(frames[0], np.ndarray):
        raise PlayError(f"{env_id} does not render rgb arrays; nothing to record")
    done = False
    while not done:
        action = actor.act_deterministic(torch.as_tensor(obs, dtype=torch.float32)).numpy()
        if isinstance(env.action_space, gym.spaces.Box):
            action = np.clip(action, env.action_space.low, env.action_space.high)
        obs, _, terminated, truncated, _ = env.step(action)
        frames.append(env.render())
        done = terminated or truncated
    fps = env.metadata.get("render_fps") or 30
    env.close()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return len(images)


def play(args: argparse.Namespace) -> dict:
    """Run the package's episodes (and record a GIF); returns what hivegym-play prints. Raises PlayError."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from hivegym.protocol.rollout import evaluate

    manifest, actor = load(args.path, args.key)
    check_env(manifest, actor)
    returns = evaluate(actor, manifest["env_id"], args.episodes, args.seed)
    result = {"name": manifest["name"], "env_id": manifest["env_id"], "params": manifest["params"],
              "episodes": args.episodes, "seed": args.seed, "mean": float(np.mean(returns)),
              "std": float(np.std(returns)), "min": float(np.min(returns)), "max": float(np.max(returns)),
              "signature": "verified" if args.key else "not checked (no --key)"}
    if args.record is not None:
        result["recorded"] = {"file": str(args.record), "frames": record(actor, manifest["env_id"], args.seed,
                                                                          args.record)}
    return result
