"""RunConfig: the one configuration of a training run, handed by the coordinator to every peer."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass
from typing import Any, Literal

Compression = Literal["none", "float16", "uint8", "blockwise8bit"]


REMOVED = {  # keys that older configs may still carry, and why they went
    "sync_mode": "every peer takes local PPO steps and rounds average parameters (gradient averaging was removed, "
                 "docs/ARCHITECTURE.md)",
    "powersgd_rank": "PowerSGD compressed averaged gradients, which are no longer averaged",
}


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    run_id: str = "hivegym-cartpole"
    """Name of the run; prefixes every hivemind key, so two runs on one DHT never mix."""
    env_id: str = "CartPole-v1"
    """Gymnasium environment id (discrete or Box action space, vector observations)."""
    hidden_width: int = 64
    """Width of each hidden layer of the actor and critic MLPs."""
    hidden_layers: int = 2
    """Number of hidden layers of the actor and critic MLPs."""
    seed: int = 0
    """Base seed: initial weights and every peer's environment seeds derive from it."""

    num_envs: int = 4
    """Vector environments per peer (gymnasium SyncVectorEnv); also the env streams of a batch. A round averages one
    batch per peer, so the swarm's batch per update is this times the peers: 4 suits two volunteers (one process
    learns best with 8; docs/ARCHITECTURE.md, "Learning per env step")."""
    rollout_steps: int = 128
    """Steps per environment in one batch; every batch starts from seeded resets (episodes longer than this are cut
    and bootstrapped from the value)."""
    update_epochs: int = 10
    """PPO passes over each rollout."""
    minibatch_size: int = 128
    """Samples per Adam step of a batch's PPO passes. A peer's update moves about as far as its number of Adam steps
    allows, so a peer with half of one process's batch keeps the same number of steps with half its minibatch."""
    learning_rate: float = 3e-3
    """Adam learning rate."""
    gamma: float = 0.98
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE lambda."""
    clip_coef: float = 0.2
    """PPO surrogate clipping range."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    max_grad_norm: float = 0.5
    """Local gradients are clipped to this L2 norm before they are averaged."""

    target_batch_size: int = 10240
    """Samples the whole swarm accumulates per epoch, a batch counting num_envs * rollout_steps * update_epochs: one
    batch from each of two volunteers by default."""
    compression: Compression = "float16"
    """Codec for averaged parameters: none, float16, uint8, blockwise8bit."""

    matchmaking_time: float = 0.5
    """Seconds hivemind waits to gather peers into an averaging group."""
    averaging_timeout: float = 10.0
    """Seconds before an averaging round is abandoned; a dead peer costs at most this."""
    load_state_timeout: float = 30.0
    """Seconds to download the swarm's state when joining or after falling behind."""
    rpc_timeout: float = 5.0
    """Seconds each gRPC call to the coordinator may take."""
    rpc_retries: int = 3
    """Attempts of a gRPC call to the coordinator before giving up (exponential backoff)."""

    eval_every: int = 1
    """The coordinator evaluates the policy every this many epochs."""
    eval_episodes: int = 10
    """Episodes per evaluation (deterministic actions, fixed seeds)."""
    eval_seed: int = 1_000_000
    """Seed of the first evaluation episode; episode i uses eval_seed + i."""

    sketch_dim: int = 32
    """Random directions that receipts project parameters and contributions onto."""
    audit_rate: float = 0.05
    """Share of receipts the coordinator replays."""
    audit_rate_new: float = 0.5
    """Share replayed of a peer's receipts while it is new: its first new_peer_receipts, until one of its audits has
    passed, and after a failed audit."""
    audit_idle: bool = True
    """Run the coordinator's audits only on CPU time nothing else wants (Linux SCHED_IDLE), so they never slow its
    trusted peer; they wait while the machine is saturated (past params_history epochs they are skipped). False:
    nice 10, for a coordinator that shares its cores with busy local peers."""
    new_peer_receipts: int = 10
    """Receipts a peer counts as new for (audited at audit_rate_new)."""
    strikes_to_ban: int = 2
    """Failed audits that ban a peer."""
    params_history: int = 32
    """Epochs of parameters the coordinator keeps for audits; older receipts are refused."""
    token_ttl: float = 120.0
    """Seconds an access token lasts; peers renew at half of it."""
    max_env_steps_per_second: float = 1_000_000.0
    """A peer claiming more env steps since it joined than this rate allows is refused."""

    distill_sizes: str = "tiny=0.01,small=0.05,medium=0.2"
    """Students to distil, NAME=FRACTION of the teacher's actor parameters, comma-separated; "" distils none."""
    distill_margin: float = 25.0
    """Distil when the evaluation return beats the one last distilled by this much (return units)."""
    distill_every: int = 0
    """Also distil every this many epochs (0: only on improvement, and at the end of a run that reached its target)."""
    distill_iterations: int = 30
    """Most DAgger iterations per student (each one collects and labels 1024 states, then trains)."""
    distill_episodes: int = 20
    """Seeded episodes (from eval_seed) on which teacher and student are compared in the manifest."""

    def __post_init__(self) -> None:
        _check_types(self)
        positive = ["hidden_width", "hidden_layers", "num_envs", "rollout_steps", "update_epochs",
                    "minibatch_size", "target_batch_size", "rpc_retries", "eval_every",
                    "eval_episodes", "learning_rate", "matchmaking_time", "averaging_timeout",
                    "load_state_timeout", "rpc_timeout", "max_grad_norm", "distill_iterations",
                    "distill_episodes", "sketch_dim", "new_peer_receipts", "strikes_to_ban", "params_history",
                    "token_ttl", "max_env_steps_per_second"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ["audit_rate", "audit_rate_new"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ["gamma", "gae_lambda", "clip_coef"]:
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        # gymnasium refuses negative seeds
        for name in ["ent_coef", "vf_coef", "eval_seed", "distill_margin", "distill_every"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.run_id.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"run_id must be letters, digits, '-' or '_', got {self.run_id!r}")
        parse_sizes(self.distill_sizes)

    @property
    def rollout_size(self) -> int:
        return self.num_envs * self.rollout_steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return from_dict(data)


def parse_sizes(text: str) -> dict[str, float]:
    """'tiny=0.01,small=0.05' -> {'tiny': 0.01, 'small': 0.05}: student names and their parameter fractions."""
    sizes: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name) or name == "teacher" or name in sizes:
            raise ConfigError(f"distill_sizes: {name!r} must be a new name of 1-16 lowercase letters and digits, "
                              f"not 'teacher'")
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"distill_sizes: {item!r} must be NAME=FRACTION with 0 < FRACTION < 1")
        sizes[name] = fraction
    return sizes


def from_dict(data: Any) -> RunConfig:
    """Build a RunConfig, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a table of keys, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in sorted(set(data) & set(REMOVED)):
        raise ConfigError(f"config key {key!r} was removed: {REMOVED[key]}; delete it")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known keys: {', '.join(sorted(known))})")
    return RunConfig(**data)


def load(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (flat keys) and apply `key=value` overrides; values parse as TOML literals."""
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            data[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            data[key] = text.strip()  # a bare word is a string: --set env_id=Acrobot-v1
    return from_dict(data)


def _check_types(config: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            if value not in typing.get_args(hint):
                choices = ", ".join(map(str, typing.get_args(hint)))
                raise ConfigError(f"{f.name} must be one of {choices}; got {value!r}")
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, f.name, float(value))
            continue
        if type(value) is not hint:
            raise ConfigError(f"{f.name} must be {hint.__name__}, got {type(value).__name__} {value!r}")
        if hint is float and not math.isfinite(value):  # nan slips through every range check below
            raise ConfigError(f"{f.name} must be finite, got {value!r}")
