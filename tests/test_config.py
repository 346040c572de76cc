"""RunConfig: defaults, TOML files, --set overrides, validation messages, JSON round trip."""

import dataclasses

import pytest

from hivegym.protocol.config import ConfigError, RunConfig, from_dict, load


def test_defaults_are_valid():
    config = RunConfig()
    assert config.rollout_size == config.num_envs * config.rollout_steps
    assert load() == config


def test_load_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('env_id = "Pendulum-v1"\nnum_envs = 4\nlearning_rate = 1e-3\ncompression = "uint8"\n')
    config = load(str(path))
    assert (config.env_id, config.num_envs, config.learning_rate, config.compression) == ("Pendulum-v1", 4, 1e-3,
                                                                                          "uint8")


def test_overrides_apply_on_top_of_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("num_envs = 4\nseed = 3\n")
    config = load(str(path), ["num_envs=16", "gamma=0.9", 'run_id="abc"', "env_id=Acrobot-v1",
                              "compression = none", "ent_coef=0.01"])
    assert config.num_envs == 16
    assert config.seed == 3
    assert config.gamma == 0.9
    assert config.run_id == "abc"
    assert config.env_id == "Acrobot-v1"  # a bare word is a string
    assert config.compression == "none"
    assert config.ent_coef == 0.01


def test_int_accepted_for_float_field():
    config = load(None, ["learning_rate=1", "averaging_timeout=20"])
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert isinstance(config.averaging_timeout, float)
    assert isinstance(RunConfig(gamma=1).gamma, float)


@pytest.mark.parametrize("override", ["bogus=1", "learning_rat=0.1"])
def test_unknown_key_rejected(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load(None, [override])


def test_unknown_key_in_file_rejected(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("numenvs = 4\n")
    with pytest.raises(ConfigError, match="numenvs"):
        load(str(path))


@pytest.mark.parametrize("override, key", [
    ('num_envs="x"', "num_envs"),
    ("num_envs=x", "num_envs"),
    ("num_envs=1.5", "num_envs"),
    ("num_envs=true", "num_envs"),
    ("learning_rate=true", "learning_rate"),
    ('learning_rate="0.1"', "learning_rate"),
    ("env_id=3", "env_id"),
    ("num_envs=[1, 2]", "num_envs"),
])
def test_wrong_type_rejected(override, key):
    with pytest.raises(ConfigError, match=key):
        load(None, [override])


@pytest.mark.parametrize("overrides, key", [
    (["learning_rate=-1"], "learning_rate"),
    (["learning_rate=0"], "learning_rate"),
    (["learning_rate=nan"], "learning_rate"),
    (["averaging_timeout=inf"], "averaging_timeout"),
    (["ent_coef=-0.1"], "ent_coef"),
    (["gamma=2"], "gamma"),
    (["gamma=0"], "gamma"),
    (["clip_coef=1.5"], "clip_coef"),
    (["num_envs=0"], "num_envs"),
    (["eval_seed=-1"], "eval_seed"),
    (["compression=zip"], "compression"),
    (["compression=powersgd"], "compression"),
    (["sync_mode=local"], "'sync_mode' was removed"),
    (["powersgd_rank=4"], "'powersgd_rank' was removed"),
    (["run_id=a/b"], "run_id"),
    (["run_id="], "run_id"),
])
def test_invalid_value_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load(None, overrides)


@pytest.mark.parametrize("override", ["num_envs", "=3", ""])
def test_override_without_key_value_rejected(override):
    with pytest.raises(ConfigError, match="key=value"):
        load(None, [override])


def test_json_round_trip():
    config = RunConfig(env_id="Pendulum-v1", learning_rate=1e-4, compression="blockwise8bit")
    assert RunConfig.from_json(config.to_json()) == config
    assert RunConfig.from_json(RunConfig().to_json()) == RunConfig()


def test_from_json_rejects_bad_input():
    with pytest.raises(ConfigError, match="JSON"):
        RunConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="table"):
        RunConfig.from_json("[1, 2]")
    with pytest.raises(ConfigError, match="extra"):
        RunConfig.from_json('{"extra": 1}')


def test_from_dict_subset_keeps_defaults():
    config = from_dict({"num_envs": 2})
    assert dataclasses.replace(config, num_envs=RunConfig().num_envs) == RunConfig()


def test_malformed_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("num_envs = = 4\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))
