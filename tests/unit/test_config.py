"""The config tree: bad input fails at start-up naming the field, the value and what is accepted."""

import pytest

from megatron_s2l.config import ConfigError, S2LConfig, apply_overrides


def _errors(**sections) -> str:
    with pytest.raises(ConfigError) as caught:
        S2LConfig.from_dict(sections).validate()
    return str(caught.value)


def test_defaults_with_an_explorer_path_validate():
    cfg = S2LConfig.from_dict({"explorer": {"hf_path": "/models/explorer"}}).validate()
    assert (cfg.schedule.group_size, cfg.schedule.t_mix, cfg.loss.clip_low) == (8, 8, 0.2)


@pytest.mark.parametrize("section, value, expected", [
    ("schedule", {"group_size": 0}, "schedule.group_size=0: must be >= 1"),
    ("schedule", {"t_mix": 0}, "schedule.t_mix=0: must be >= 1"),
    ("loss", {"clip_low": 1.5}, "loss.clip_low=1.5: must be in [0, 1)"),
    ("loss", {"dual_clip": 0.5}, "loss.dual_clip=0.5: must be > 1 or null"),
    ("sampling_top_p", None, "learner_sampling.top_p=1.5: must be in (0, 1]"),
    ("seed", -1, "seed=-1: must be >= 0"),
    ("data", {"task_ops": "+/"}, "data.task_ops='+/': must be a non-empty selection of '+-*'"),
    ("data", {"task_max_addend": 0}, "data.task_max_addend=0: must be >= 1"),
])
def test_a_bad_value_names_the_field_and_the_accepted_range(section, value, expected):
    sections = {"explorer": {"hf_path": "/m"}}
    if section == "sampling_top_p":
        sections["learner_sampling"] = {"top_p": 1.5}
    else:
        sections[section] = value
    assert expected in _errors(**sections)


def test_t_mix_above_the_number_of_steps_is_allowed():
    S2LConfig.from_dict({"train_steps": 4, "schedule": {"t_mix": 100}, "explorer": {"hf_path": "/m"}}).validate()


def test_every_problem_is_reported_at_once():
    message = _errors(schedule={"group_size": 0, "t_mix": 0}, loss={"clip_low": 2.0})
    assert message.count("\n") == 4  # header + the three problems + the missing explorer path
    assert "explorer.hf_path is empty" in message


@pytest.mark.parametrize("data, expected", [
    ({"schedule": {"kind": "exponential"}}, "schedule.kind='exponential': accepted values are "
                                            "['linear', 'cosine', 'step', 'constant']"),
    ({"schedule": {"group_mode": "mixed"}}, "schedule.group_mode='mixed': accepted values are ['combined', 'separate']"),
    ({"loss": {"kl_type": "k2"}}, "loss.kl_type='k2': accepted values are ['k1', 'k3', 'low_var_kl']"),
    ({"schedule": {"group_sise": 8}}, "schedule: unknown key(s) ['group_sise']"),
    ({"schedule": {"group_size": "eight"}}, "schedule.group_size='eight': expected int"),
    ({"schedule": {"group_size": True}}, "schedule.group_size=True: expected int"),
])
def test_unknown_names_and_wrong_types_fail_while_parsing(data, expected):
    with pytest.raises(ConfigError) as caught:
        S2LConfig.from_dict(data)
    assert expected in str(caught.value)


def test_overrides_parse_yaml_values_into_nested_sections():
    data = apply_overrides({"schedule": {"t_mix": 8}}, ["schedule.t_mix=4", "loss.dual_clip=3", "explorer.hf_path=/x",
                                                        "optim.lr=1e-4"])
    cfg = S2LConfig.from_dict(data)
    assert (cfg.schedule.t_mix, cfg.loss.dual_clip, cfg.explorer.hf_path, cfg.optim.lr) == (4, 3.0, "/x", 1e-4)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["schedule.t_mix"])
