"""Config files and command-line overrides."""

from __future__ import annotations

import pytest

from mstar_jax.config import apply_override, diff_configs, load_config, parse_overrides
from mstar_jax.errors import ConfigError

CONFIG = '''
from ml_collections import ConfigDict

def get_config():
    return ConfigDict({"seed": 0, "train": {"lr": 1e-6, "method": "continuous", "freeze_vision": False,
                                             "interval": 0.25, "grid": [0.3, 0.4]}, "model": {"path": None}})
'''


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(CONFIG)
    return path


def test_overrides_keep_types(cfg_file):
    cfg = load_config(str(cfg_file), ["--config.train.lr=3e-4", "--config.seed", "7", "--config.train.method=rest_em",
                                      "--config.train.freeze_vision=true", "--config.train.interval=1",
                                      "--config.model.path=/ckpt", "--config.train.grid=[0.5,0.6]"])
    assert cfg.train.lr == 3e-4 and cfg.seed == 7 and cfg.train.method == "rest_em"
    assert cfg.train.freeze_vision is True and cfg.train.interval == 1.0 and isinstance(cfg.train.interval, float)
    assert cfg.model.path == "/ckpt" and list(cfg.train.grid) == [0.5, 0.6]


def test_unknown_key_lists_close_names(cfg_file):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*train\.lr"):
        load_config(str(cfg_file), ["--config.train.lrr=1"])


def test_bad_value_and_bad_argument(cfg_file):
    cfg = load_config(str(cfg_file))
    with pytest.raises(ConfigError, match="seed"):
        apply_override(cfg, "seed", "many")
    with pytest.raises(ConfigError, match="unrecognised"):
        parse_overrides(["--lr=3"])


def test_missing_config_file_names_known_configs(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.py"))


def test_diff_configs_names_changed_keys(cfg_file):
    a = load_config(str(cfg_file))
    b = load_config(str(cfg_file), ["--config.train.lr=0.1"])
    assert diff_configs(a, b) == ["train.lr: 1e-06 != 0.1"]
    assert diff_configs(a, a) == []


def test_keys_added_at_their_default_are_no_difference():
    """A workdir written before a key existed resumes when the key holds the value that keeps the old behaviour."""
    previous = {"sampling": {"max_new_tokens": 48}, "train": {"lr": 0.1}}
    defaults = {"sampling": {"max_new_tokens": 48, "dtype": ""}, "train": {"lr": 0.5}}
    same = {"sampling": {"max_new_tokens": 48, "dtype": ""}, "train": {"lr": 0.1}}
    assert diff_configs(previous, same, defaults=defaults) == []
    assert diff_configs(previous, same) == ["sampling.dtype: '<missing>' != ''"]  # strict without defaults
    other = {"sampling": {"max_new_tokens": 48, "dtype": "bfloat16"}, "train": {"lr": 0.1}}
    assert diff_configs(previous, other, defaults=defaults) == ["sampling.dtype: '<missing>' != 'bfloat16'"]
    # A removed key or a changed value is still a difference, defaults or not.
    assert diff_configs(same, previous, defaults=defaults) == ["sampling.dtype: '' != '<missing>'"]
    assert diff_configs(previous, {**same, "train": {"lr": 0.5}}, defaults=defaults) == ["train.lr: 0.1 != 0.5"]


def test_workdir_of_an_earlier_version_resumes_with_the_new_keys_at_default(tmp_path):
    import json

    from mstar_jax.config import default_values
    from mstar_jax.loop.run import check_workdir_config

    cfg = load_config("smoke")
    stored = json.loads(cfg.to_json())
    del stored["sampling"]["dtype"]  # as written before the key was added
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert default_values()["sampling"]["dtype"] == ""
    check_workdir_config(cfg, tmp_path)  # accepted
    with pytest.raises(ConfigError, match="sampling.dtype"):
        check_workdir_config(load_config("smoke", ["--config.sampling.dtype=bfloat16"]), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("--config.train.lr=abc", "--config.train.lr=abc: cannot parse 'abc' as a float"),
    ("--config.train.epochs=1.5", "--config.train.epochs=1.5: Could not override field 'epochs'"),
    ("--config.train.lr=[1,2]", "--config.train.lr=[1,2]: Could not override field 'lr'"),
    ("--config.adaptive.enabled=maybe", "--config.adaptive.enabled=maybe: expected a boolean, got 'maybe'"),
    ("--config.data.synth_sizes=3", "--config.data.synth_sizes=3: Could not override field 'synth_sizes'"),
])
def test_an_override_of_the_wrong_type_is_one_line_through_the_cli(tmp_path, capsys, override, message):
    """Refused before anything runs or is written (the dry run and a real run parse the same way)."""
    from mstar_jax.cli import main

    for extra in (["--dry-run"], []):
        assert main(["train", "--config", "smoke", "--workdir", str(tmp_path / "run"), override, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mstar train: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_workdir_written_before_the_prm_is_not_resumed_with_one(tmp_path):
    """The PRM keys' defaults change what a run does: a workdir from before them (no prm section, mean-logprob
    scorers) is refused under the new defaults, naming the keys, and resumes with the old values given."""
    import json

    from mstar_jax.loop.run import check_workdir_config

    cfg = load_config("smoke")
    stored = json.loads(cfg.to_json())
    for section, key in (("train", "selection"), ("train", "scorer"), ("train", "threshold"),
                         ("train", "threshold_step"), ("dynamics", "scorer"), ("data", "unlabeled"),
                         ("data", "unlabeled_answers")):
        del stored[section][key]
    del stored["prm"], stored["unlabeled"]
    stored["data"]["synth_sizes"]["unlabeled"] = 0
    (tmp_path / "config.json").write_text(json.dumps(stored))
    old = ["--config.prm.enabled=False", "--config.train.scorer=mean_logprob", "--config.dynamics.scorer=mean_logprob",
           "--config.unlabeled.enabled=False", "--config.data.synth_sizes.unlabeled=0"]
    with pytest.raises(ConfigError) as err:
        check_workdir_config(load_config("smoke", old[3:]), tmp_path)
    assert "prm" in str(err.value) and "dynamics.scorer" in str(err.value)
    check_workdir_config(load_config("smoke", old), tmp_path)  # the earlier behaviour, spelled out: accepted
