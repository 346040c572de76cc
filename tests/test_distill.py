"""Distillation: the KL losses against torch's, student sizes, a CartPole teacher distilled into a student of at
most 10% of its parameters, and a real hivegym-launch that publishes signed checkpoints one can pull and play."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from hivegym.coordinator.distiller import Distiller
from hivegym.distill.actor import Actor, actor_params, width_for
from hivegym.distill.dagger import Settings, distill, kl_categorical, kl_gaussian
from hivegym.distill.package import manifests
from hivegym.distill.teacher import train_teacher
from hivegym.protocol.checkpoint import sign_manifest, signed_bytes, verify_signature
from hivegym.protocol.config import RunConfig
from hivegym.protocol.identity import Identity
from hivegym.protocol.policy import build_policy, parameter_count
from hivegym.protocol.rollout import evaluate
from procs import start_coordinator, wait_for


def test_kl_categorical_matches_torch():
    t, s = torch.randn(5, 3), torch.randn(5, 3)
    expected = kl_divergence(Categorical(logits=t), Categorical(logits=s))
    assert torch.allclose(kl_categorical(t, s), expected, atol=1e-6)
    assert torch.allclose(kl_categorical(t, t), torch.zeros(5), atol=1e-6)


def test_kl_gaussian_matches_torch():
    tm, sm, tls, sls = torch.randn(5, 2), torch.randn(5, 2), torch.randn(2), torch.randn(2)
    expected = kl_divergence(Normal(tm, tls.exp()), Normal(sm, sls.exp())).sum(-1)
    assert torch.allclose(kl_gaussian(tm, tls, sm, sls), expected, atol=1e-5)


def test_student_width_stays_within_its_share():
    teacher = Actor.from_teacher(build_policy("CartPole-v1", 64, 2, seed=0))
    assert parameter_count(teacher) == actor_params(4, 2, True, [64, 64])
    for fraction in (0.01, 0.05, 0.1):
        width = width_for(fraction, teacher)
        assert actor_params(4, 2, True, [width] * 2) <= fraction * parameter_count(teacher)
        assert actor_params(4, 2, True, [width + 1] * 2) > fraction * parameter_count(teacher)


def test_teacher_actor_acts_like_the_policy():
    policy = build_policy("Pendulum-v1", 16, 2, seed=3)
    actor = Actor.from_teacher(policy)
    obs = torch.randn(7, 3)
    assert torch.equal(actor.act_deterministic(obs), policy.act_deterministic(obs))
    assert torch.equal(actor.log_std, policy.log_std)


def test_distiller_requests_on_improvement_by_the_margin(tmp_path):
    config = dataclasses.replace(RunConfig(), distill_margin=25.0)
    distiller = Distiller(config, tmp_path, Identity.generate())
    requested = []
    for epoch, mean in enumerate([20.0, 40.0, 46.0, 44.0, 120.0, 140.0], start=1):
        distiller.on_evaluation(epoch, mean, {"epoch": torch.tensor(epoch)})
        if distiller.queued is not None:
            requested.append(distiller.queued[0])
            distiller.queued = None
    assert requested == [1, 3, 5]  # 20, then 46 >= 20 + 25, then 120 >= 46 + 25; 140 < 145
    off = Distiller(dataclasses.replace(config, distill_sizes=""), tmp_path, Identity.generate())
    off.on_evaluation(1, 500.0, {})
    off.finish()
    assert off.queued is None and off.job is None and off.pool is None


@pytest.mark.slow
def test_cartpole_student_with_a_tenth_of_the_parameters_keeps_95_percent():
    torch.set_num_threads(1)
    config = dataclasses.replace(RunConfig(), eval_every=10)
    policy, info = train_teacher(config, target_return=475, max_env_steps=150_000)
    teacher = Actor.from_teacher(policy)
    settings = Settings(eval_episodes=20, seed=1)
    result = distill(teacher, "CartPole-v1", {"small": 0.1}, settings)
    student = result.results[0].student
    assert parameter_count(student) <= 0.1 * parameter_count(teacher)
    # both on the same 20 seeded episodes, recomputed here rather than trusted from the result
    teacher_mean = np.mean(evaluate(teacher, "CartPole-v1", 20, settings.eval_seed))
    student_mean = np.mean(evaluate(student, "CartPole-v1", 20, settings.eval_seed))
    assert teacher_mean >= 400, info  # a teacher worth distilling
    assert student_mean >= 0.95 * teacher_mean, (student_mean, teacher_mean, result.results[0].history)
    assert student_mean == pytest.approx(result.results[0].mean)
    # its signed manifest says the same
    identity = Identity.generate()
    manifest, _ = manifests("CartPole-v1", teacher, 5, "test", result, settings)[1]
    signed = sign_manifest({**manifest, "weights": {"sha256": "0" * 64, "bytes": 1}}, identity)
    verify_signature(signed, identity.public_key)
    assert signed["evaluation"]["mean_return"] == pytest.approx(student_mean)
    assert signed["evaluation"]["teacher_mean_return"] == pytest.approx(teacher_mean)
    assert signed_bytes(signed).startswith(b"hivegym checkpoint manifest v1\n{")


@pytest.mark.slow
def test_launch_publishes_checkpoints_that_pull_and_play(tmp_path):
    """A real coordinator with one local peer distils on improvement; pull from it while it runs, then play."""
    run_dir = tmp_path / "run"
    coordinator, address = start_coordinator(run_dir, "--local-peers", "1", "--max-minutes", "5",
                                             "--set", "distill_sizes='tiny=0.05'", "--set", "distill_iterations=6")
    try:
        info = json.loads((run_dir / "coordinator.json").read_text())
        assert info["join"] == f"{address}#{info['public_key']}"
        assert (run_dir / "coordinator.key").stat().st_mode & 0o777 == 0o600
        wait_for(lambda: (run_dir / "checkpoints" / "CartPole-v1-tiny.json").exists(), 240, "a distilled checkpoint")
        pulled = subprocess.run([sys.executable, "-m", "hivegym.distill.cli", "pull", "--coordinator", info["join"],
                                 "--size", "tiny", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                                timeout=60)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        coordinator.stop()
    played = subprocess.run([sys.executable, "-m", "hivegym.distill.cli", "play", str(tmp_path / "out" / "CartPole-v1-tiny"),
                             "--episodes", "3", "--key", info["join"]], capture_output=True, text=True, timeout=60)
    assert played.returncode == 0, played.stderr
    assert json.loads(played.stdout)["signature"] == "verified"
    log = coordinator.text()
    assert "distillation of epoch" in log and "published CartPole-v1-teacher" in log, log[-3000:]
