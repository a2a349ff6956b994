"""The config tree: bad input fails at start-up naming the field, the value and what is accepted, every
problem at once."""

import json

import pytest

from megatron_s2l.config import ConfigError, S2LConfig, apply_overrides


def _errors(**sections) -> str:
    with pytest.raises(ConfigError) as caught:
        S2LConfig.from_dict(sections).validate()
    return str(caught.value)


def _model_dir(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return str(path)


def test_defaults_with_an_explorer_path_validate():
    cfg = S2LConfig.from_dict({"explorer": {"hf_path": "/models/explorer"}}).validate(check_files=False)
    assert (cfg.schedule.group_size, cfg.schedule.t_mix, cfg.loss.clip_low) == (8, 8, 0.2)


@pytest.mark.parametrize("section, value, expected", [
    ("schedule", {"group_size": 0}, "schedule.group_size=0: must be >= 1"),
    ("schedule", {"t_mix": 0}, "schedule.t_mix=0: must be >= 1"),
    ("loss", {"clip_low": 1.5}, "loss.clip_low=1.5: must be in [0, 1)"),
    ("loss", {"dual_clip": 0.5}, "loss.dual_clip=0.5: must be > 1 or null"),
    ("sampling_top_p", None, "learner_sampling.top_p=1.5: must be in (0, 1]"),
    ("seed", -1, "seed=-1: must be >= 0"),
    ("optim", {"logprob_micro_batch_size": -1}, "optim.logprob_micro_batch_size=-1: must be >= 0 (0: "
     "optim.micro_batch_size)"),
    ("data", {"task": {"ops": "+/"}}, "data.task.ops='+/': must be a non-empty selection of '+-*'"),
    ("data", {"task": {"max_addend": 0}}, "data.task.max_addend=0: must be >= 1"),
    ("data", {"task": {"num_eval": 0, "modulus": 1}}, "data.task.num_eval=0: must be > 0"),
    ("schedule", {"allocation": "adaptive", "group_mode": "separate"},
     "schedule.allocation='adaptive' with schedule.group_mode='separate': adaptive allocation adds explorer samples "
     "to the learner's groups, so it needs schedule.group_mode='combined'"),
])
def test_a_bad_value_names_the_field_and_the_accepted_range(section, value, expected):
    sections = {"explorer": {"hf_path": "/m"}}
    if section == "sampling_top_p":
        sections["learner_sampling"] = {"top_p": 1.5}
    else:
        sections[section] = value
    assert expected in _errors(**sections)


def test_t_mix_above_the_number_of_steps_is_allowed():
    S2LConfig.from_dict({"train_steps": 4, "schedule": {"t_mix": 100}, "explorer": {"hf_path": "/m"}}).validate(
        check_files=False)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        S2LConfig.from_dict({"schedule": {"group_size": 0, "t_mix": 0}, "loss": {"clip_low": 2.0}}).validate()
    assert caught.value.problems == [
        "schedule.group_size=0: must be >= 1 (the paper uses 8 or 16)",
        "schedule.t_mix=0: must be >= 1 (set schedule.kind or explorer.source='none' for plain GRPO); values above "
        "the number of steps are allowed",
        "loss.clip_low=2.0: must be in [0, 1) (ratio floor is 1 - clip_low)",
        "learner.hf_path is empty: set it to the learner's local HF directory (convert a Megatron checkpoint with "
        "tools/convert_megatron_to_hf.py), or run the demo without --config",
        "explorer.hf_path is empty: source='online' needs the explorer's local HF directory (or set "
        "explorer.source='offline' with explorer.cache_path)"]
    assert str(caught.value).splitlines()[0] == "5 problems:"


def test_parse_problems_come_with_the_value_and_path_problems(tmp_path):
    """Misspelt section and key, a wrong type, a near-miss choice: all reported together with what the rest of
    the tree gets wrong, each misspelling with the closest accepted name."""
    learner = _model_dir(tmp_path / "learner")
    data = {"schedul": {"t_mix": 4}, "loss": {"kl_typ": "k3", "clip_low": 1.5},
            "schedule": {"kind": "linaer", "group_size": "eight"}, "learner": {"hf_path": learner},
            "explorer": {"hf_path": str(tmp_path / "missing")}, "data": {"train_path": str(tmp_path / "p.jsonl")}}
    with pytest.raises(ConfigError) as caught:
        S2LConfig.from_dict(data)
    assert caught.value.problems == [
        "schedul: unknown section; did you mean 'schedule'?",
        "loss.kl_typ: unknown key; did you mean 'kl_type'?",
        "schedule.kind='linaer': accepted values are ['linear', 'cosine', 'step', 'constant']; did you mean "
        "'linear'?",
        "schedule.group_size='eight': expected int",
        "loss.clip_low=1.5: must be in [0, 1) (ratio floor is 1 - clip_low)",
        f"explorer.hf_path='{tmp_path}/missing': no such directory (expected a local HF model directory with "
        f"config.json and *.safetensors)",
        f"data.train_path='{tmp_path}/p.jsonl': no such file"]


def test_an_unknown_key_far_from_every_name_lists_the_accepted_ones():
    cfg, problems = S2LConfig.parse({"fp8": {"zzz": 1}, "seed": 3})
    assert problems == ["fp8.zzz: unknown key; accepted: enabled, recipe"]
    assert cfg.seed == 3  # the rest of the tree is built


@pytest.mark.parametrize("checkpoint, expected", [
    ({"load_dir": "nowhere"}, ["checkpoint.load_dir='nowhere': no such directory (point it at a checkpoint root "
                               "holding 'latest'; a load_dir equal to save_dir may be absent on the first run)"]),
    ({"load_dir": "run/ck", "save_dir": "run/ck"}, []),  # the first run of a job that resumes from its own saves
])
def test_a_missing_load_dir_is_an_error_unless_it_is_the_save_dir(tmp_path, checkpoint, expected):
    models = {"learner": {"hf_path": _model_dir(tmp_path / "l")}, "explorer": {"hf_path": _model_dir(tmp_path / "e")}}
    assert S2LConfig.from_dict(models | {"checkpoint": checkpoint}).problems() == expected


def test_a_model_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "learner").mkdir()
    cfg = S2LConfig.from_dict({"learner": {"hf_path": str(tmp_path / "learner")}, "explorer": {"source": "none"}})
    assert cfg.problems() == [f"learner.hf_path='{tmp_path}/learner': config.json is missing (copy the whole HF "
                              f"model directory)"]
    assert cfg.problems(check_files=False) == []


def test_an_unreadable_config_file_is_the_only_problem(tmp_path):
    with pytest.raises(ConfigError) as caught:
        S2LConfig.parse_yaml(tmp_path / "absent.yaml", ["schedule.t_mix=x"])
    assert caught.value.problems == [f"config file {tmp_path}/absent.yaml: no such file (pass an existing YAML to "
                                     f"--config, e.g. examples/configs/demo.yaml)"]
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of sections, got list"):
        S2LConfig.parse_yaml(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("schedule: {t_mix: 4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(while parsing a flow mapping"):
        S2LConfig.parse_yaml(tmp_path / "broken.yaml")


@pytest.mark.parametrize("data, expected", [
    ({"schedule": {"kind": "exponential"}}, "schedule.kind='exponential': accepted values are "
                                            "['linear', 'cosine', 'step', 'constant']\n"),
    ({"schedule": {"group_mode": "mixed"}}, "schedule.group_mode='mixed': accepted values are ['combined', 'separate']"),
    ({"schedule": {"allocation": "per_prompt"}}, "schedule.allocation='per_prompt': accepted values are "
                                                 "['fixed', 'adaptive']"),
    ({"loss": {"kl_type": "k2"}}, "loss.kl_type='k2': accepted values are ['k1', 'k3', 'low_var_kl']"),
    ({"schedule": {"group_sise": 8}}, "schedule.group_sise: unknown key; did you mean 'group_size'?"),
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


def test_every_bad_override_is_collected():
    with pytest.raises(ConfigError) as caught:
        apply_overrides({"seed": 1}, ["schedule.t_mix", "seed.x=1", "loss.kl_coef=[", "seed=2"])
    problems = caught.value.problems
    assert problems[:2] == ["override 'schedule.t_mix': expected dotted.key=value, e.g. schedule.t_mix=4",
                            "override 'seed.x=1': 'seed' is not a section"]
    assert problems[2].startswith("override 'loss.kl_coef=[': the value is not valid YAML (")
    assert len(problems) == 3


def test_each_engine_must_hold_the_longest_prompt_plus_its_own_new_tokens():
    engine = {"max_model_len": 160}
    message = _errors(data={"max_prompt_length": 128}, learner_engine=engine, learner_sampling={"max_new_tokens": 32},
                      explorer={"hf_path": "/m", "engine": engine, "sampling": {"max_new_tokens": 33}})
    assert "learner_engine.max_model_len" not in message  # 128 + 32 = 160 fits exactly
    assert ("explorer.engine.max_model_len=160: must hold data.max_prompt_length=128 plus "
            "explorer.sampling.max_new_tokens=33; raise it to 161") in message
    S2LConfig.from_dict({"data": {"max_prompt_length": 128}, "explorer": {  # an offline explorer has no engine
        "source": "offline", "cache_path": "c.jsonl", "engine": engine, "sampling": {"max_new_tokens": 33}}}, check_files=False).validate(check_files=False)


def test_an_architecture_key_in_the_learner_section_names_the_checkpoint_and_its_value(tmp_path):
    learner = tmp_path / "learner"
    learner.mkdir()
    (learner / "config.json").write_text(json.dumps({"model_type": "qwen3", "num_hidden_layers": 28,
                                                     "rope_parameters": {"rope_theta": 1e6}}))
    cfg, problems = S2LConfig.parse({"learner": {"hf_path": str(learner), "num_layers": 36, "rotary_base": 5e5,
                                                 "params_dtype": "bfloat16"}})
    assert problems == [
        f"learner.num_layers=36: the learner's architecture is read from {learner}/config.json, which has "
        f"num_hidden_layers=28; remove learner.num_layers from the config",
        f"learner.rotary_base=500000.0: the learner's architecture is read from {learner}/config.json, which has "
        f"rope_theta=1000000.0; remove learner.rotary_base from the config"]
    assert (cfg.learner.hf_path, cfg.learner.params_dtype) == (str(learner), "bfloat16")  # the rest is kept
    _, problems = S2LConfig.parse({"learner": {"qk_layernorm": False}})
    assert problems == ["learner.qk_layernorm=False: the learner's architecture is read from the config.json in "
                        "learner.hf_path; remove learner.qk_layernorm from the config"]
