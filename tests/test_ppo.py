"""PPO math (GAE, flattening, minibatches, clipped loss) and rollout collection on real gymnasium envs."""

import pytest
import torch

from hivegym.protocol.policy import ActorCritic, build_policy
from hivegym.protocol.ppo import Batch, flatten, gae, minibatches, ppo_loss
from hivegym.protocol.rollout import Collector, Rollout, derive_seed, evaluate


def tiny_rollout(steps=3, envs=1, obs_dim=4, act_dim=None) -> Rollout:
    shape = (steps, envs)
    actions = torch.zeros(shape, dtype=torch.long) if act_dim is None else torch.zeros(*shape, act_dim)
    return Rollout(obs=torch.arange(steps * envs * obs_dim, dtype=torch.float32).reshape(*shape, obs_dim),
                   actions=actions, logprobs=torch.zeros(shape), values=torch.zeros(shape),
                   rewards=torch.zeros(shape), dones=torch.zeros(shape), last_value=torch.zeros(envs),
                   episode_returns=[], env_returns=[[] for _ in range(envs)])


def test_gae_by_hand():
    r = tiny_rollout()
    r.rewards[:, 0] = torch.tensor([1.0, 2.0, 3.0])
    r.values[:, 0] = torch.tensor([0.5, 1.0, 1.5])
    r.dones[:, 0] = torch.tensor([0.0, 1.0, 0.0])  # the episode ends at t=1; t=2 starts a new one
    r.last_value[:] = 2.0
    adv, ret = gae(r, gamma=0.9, lam=0.8)
    # t=2: 3 + 0.9*2.0 - 1.5 = 3.3
    # t=1: done, so no bootstrap and no carry: 2 - 1.0 = 1.0
    # t=0: delta 1 + 0.9*1.0 - 0.5 = 1.4, plus 0.9*0.8*1.0 = 2.12
    torch.testing.assert_close(adv[:, 0], torch.tensor([2.12, 1.0, 3.3]))
    torch.testing.assert_close(ret[:, 0], torch.tensor([2.62, 2.0, 4.8]))


def test_gae_lambda_one_no_dones_is_discounted_return_minus_value():
    r = tiny_rollout(steps=4, envs=2)
    r.rewards[:] = 1.0
    r.values[:] = 0.25
    adv, ret = gae(r, gamma=0.5, lam=1.0)
    torch.testing.assert_close(ret[0], torch.full((2,), 1 + 0.5 + 0.25 + 0.125))
    torch.testing.assert_close(adv, ret - 0.25)


@pytest.mark.parametrize("act_dim", [None, 2])
def test_flatten_shapes_and_order(act_dim):
    r = tiny_rollout(steps=5, envs=3, obs_dim=4, act_dim=act_dim)
    batch = flatten(r, 0.99, 0.95)
    assert len(batch) == 15
    assert batch.obs.shape == (15, 4)
    assert batch.actions.shape == ((15,) if act_dim is None else (15, 2))
    for x in (batch.logprobs, batch.advantages, batch.returns):
        assert x.shape == (15,)
    torch.testing.assert_close(batch.obs[2 * 3 + 1], r.obs[2, 1])  # row t*N + n is step t of env n


def test_minibatches_cover_every_index_once():
    n = 10
    batch = Batch(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n), torch.zeros(n), torch.zeros(n),
                  torch.zeros(n))
    mbs = minibatches(batch, 4, torch.Generator().manual_seed(0))
    assert [len(mb) for mb in mbs] == [4, 4, 2]
    seen = torch.cat([mb.actions for mb in mbs])
    assert sorted(seen.tolist()) == list(range(n))
    for mb in mbs:
        assert torch.equal(mb.obs[:, 0].long(), mb.actions)  # rows stay together
    again = minibatches(batch, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a.actions, b.actions) for a, b in zip(mbs, again))


def random_batch(policy: ActorCritic, n: int, obs_dim: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g)
    with torch.no_grad():
        dist = policy.dist(obs)
        actions = dist.sample()
        logprobs = policy.log_prob(dist, actions)
    return Batch(obs, actions, logprobs, torch.randn(n, generator=g), torch.randn(n, generator=g))


@pytest.mark.parametrize("discrete", [True, False])
def test_ppo_loss_finite_with_gradient(discrete):
    torch.manual_seed(0)
    policy = ActorCritic(obs_dim=3, act_dim=2, discrete=discrete, width=8, layers=2)
    loss = ppo_loss(policy, random_batch(policy, 16, 3), clip_coef=0.2, ent_coef=0.01, vf_coef=0.5)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for module in (policy.actor, policy.critic):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


def test_ppo_loss_clips_positive_advantage_with_large_ratio():
    torch.manual_seed(0)
    policy = ActorCritic(obs_dim=3, act_dim=2, discrete=True, width=8, layers=1)
    mb = random_batch(policy, 4, 3)
    # advantages keep their signs through normalization (mean 0)
    mb.advantages = torch.tensor([1.0, 2.0, -1.0, -2.0])
    # samples 0 and 2 have ratio e^3 (far above 1 + clip); samples 1 and 3 have ratio 1
    mb.logprobs = (mb.logprobs - torch.tensor([3.0, 0.0, 3.0, 0.0])).requires_grad_()
    # d loss / d old_logprob = -(d loss / d new_logprob): it is the per-sample policy-gradient signal
    ppo_loss(policy, mb, clip_coef=0.2, ent_coef=0.0, vf_coef=0.0).backward()
    grad = mb.logprobs.grad
    assert grad[0] == 0  # positive advantage, ratio > 1 + clip: clipped, no gradient
    assert grad[1] != 0 and grad[2] != 0 and grad[3] != 0  # negative advantages are never clipped from above


def test_ppo_loss_single_clipped_sample_gives_actor_no_gradient():
    torch.manual_seed(0)
    policy = ActorCritic(obs_dim=3, act_dim=2, discrete=False, width=8, layers=1)
    mb = random_batch(policy, 1, 3)
    mb.advantages = torch.tensor([1.0])  # a batch of one is not normalized
    mb.logprobs = mb.logprobs - 5.0
    ppo_loss(policy, mb, clip_coef=0.2, ent_coef=0.0, vf_coef=0.5).backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.actor.parameters())
    assert policy.log_std.grad is None or not policy.log_std.grad.any()
    assert any(p.grad.any() for p in policy.critic.parameters())


# --- rollouts on real environments ---------------------------------------------------------------------------

@pytest.mark.parametrize("env_id, obs_dim, act_shape", [("CartPole-v1", 4, ()), ("Pendulum-v1", 3, (1,))])
def test_collect_shapes(env_id, obs_dim, act_shape):
    policy = build_policy(env_id, 16, 1, seed=0)
    collector = Collector(env_id, num_envs=3, seed=0)
    try:
        r = collector.collect(policy, steps=20, gamma=0.99, generator=torch.Generator().manual_seed(0))
        after = torch.as_tensor(collector.obs, dtype=torch.float32)
        second = collector.collect(policy, steps=5, gamma=0.99, generator=torch.Generator().manual_seed(0))
    finally:
        collector.close()
    assert r.obs.shape == (20, 3, obs_dim)
    assert r.actions.shape == (20, 3, *act_shape)
    for x in (r.logprobs, r.values, r.rewards, r.dones):
        assert x.shape == (20, 3)
        assert torch.isfinite(x).all()
    assert r.last_value.shape == (3,)
    assert set(r.dones.unique().tolist()) <= {0.0, 1.0}
    assert second.obs.shape == (5, 3, obs_dim)
    assert torch.equal(second.obs[0], after)  # the envs keep running across rollouts


def collect_twice(env_id, seed, gen_seed, steps=30):
    policy = build_policy(env_id, 16, 1, seed=0)
    collector = Collector(env_id, num_envs=2, seed=seed)
    try:
        return collector.collect(policy, steps, 0.99, torch.Generator().manual_seed(gen_seed))
    finally:
        collector.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_collect_is_deterministic(env_id):
    a, b = collect_twice(env_id, 7, 1), collect_twice(env_id, 7, 1)
    assert torch.equal(a.actions, b.actions)
    assert torch.equal(a.obs, b.obs)
    assert torch.equal(a.rewards, b.rewards)
    assert a.episode_returns == b.episode_returns
    assert not torch.equal(a.actions, collect_twice(env_id, 7, 2).actions)  # the generator drives the sampling


def constant_critic(env_id: str, value: float) -> ActorCritic:
    policy = build_policy(env_id, 16, 1, seed=0)
    with torch.no_grad():
        policy.critic[-1].weight.zero_()
        policy.critic[-1].bias.fill_(value)
    return policy


def test_truncation_is_bootstrapped():
    # Pendulum truncates at 200 steps; its rewards are <= 0, so only a bootstrapped step can exceed 0
    policy, gamma = constant_critic("Pendulum-v1", 100.0), 0.9
    collector = Collector("Pendulum-v1", num_envs=2, seed=0)
    try:
        r = collector.collect(policy, steps=201, gamma=gamma, generator=torch.Generator().manual_seed(0))
    finally:
        collector.close()
    assert r.dones[199].tolist() == [1.0, 1.0] and r.dones.sum() == 2
    assert (r.rewards[199] > gamma * 100 - 17).all()
    assert (r.rewards[:199] <= 0).all() and (r.rewards[200] <= 0).all()
    assert len(r.episode_returns) == 2 and all(x < 0 for x in r.episode_returns)


def test_termination_is_not_bootstrapped():
    policy = constant_critic("CartPole-v1", 100.0)
    collector = Collector("CartPole-v1", num_envs=2, seed=0)
    try:
        r = collector.collect(policy, steps=64, gamma=0.99, generator=torch.Generator().manual_seed(0))
    finally:
        collector.close()
    assert r.dones.sum() >= 1  # a random CartPole policy falls within 64 steps
    assert r.dones.sum() == len(r.episode_returns)
    assert (r.rewards == 1.0).all()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_evaluate_is_deterministic(env_id):
    policy = build_policy(env_id, 16, 1, seed=0)
    returns = evaluate(policy, env_id, episodes=3, seed=11)
    assert len(returns) == 3 and all(isinstance(x, float) for x in returns)
    assert evaluate(policy, env_id, episodes=3, seed=11) == returns


def test_build_policy_is_seeded():
    a, b = build_policy("CartPole-v1", 16, 2, seed=3), build_policy("CartPole-v1", 16, 2, seed=3)
    c = build_policy("CartPole-v1", 16, 2, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_derive_seed_is_stable_and_63_bit():
    assert derive_seed("run", "peer", 3) == derive_seed("run", "peer", 3)
    assert derive_seed("run", "peer", 3) != derive_seed("run", "peer", 4)
    assert 0 <= derive_seed("x") < 2**63
