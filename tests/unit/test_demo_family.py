"""The demo family's settings: the JSON a first rank hands to the builder restores the same family."""

import dataclasses
import json

from megatron_s2l.config import DataConfig, TaskConfig
from megatron_s2l.demo import FamilySpec, family_dir


def test_spec_round_trips_through_json_and_names_its_cache():
    spec = FamilySpec()
    restored = FamilySpec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec))))
    assert restored == spec and family_dir(restored) == family_dir(spec)
    slower = dataclasses.replace(spec, explorer=dataclasses.replace(
        spec.explorer, tutor=dataclasses.replace(spec.explorer.tutor, slip_rate=0.5)))
    assert family_dir(slower) != family_dir(spec)  # what a model is taught is part of the cache key


def test_only_the_task_shapes_the_family():
    """A demo run with other prompt limits or files reuses the cached family; a different task does not."""
    default = FamilySpec.of(DataConfig())
    assert FamilySpec.of(DataConfig(max_prompt_length=64, on_bad_prompt="drop")).key() == default.key()
    assert FamilySpec.of(DataConfig(task=TaskConfig(modulus=7))).key() != default.key()
    assert FamilySpec.of(DataConfig(seed=1)).key() != default.key()


def test_build_settings_that_keep_the_weights_keep_the_cache():
    """Recomputation changes memory, not the weights: a cached family stays valid (its directory name is the
    key of the default family since before `recompute` existed)."""
    spec = FamilySpec()
    recomputed = dataclasses.replace(spec, learner=dataclasses.replace(
        spec.learner, model=dataclasses.replace(spec.learner.model, recompute="full")))
    assert recomputed.key() == spec.key() == "e8f0a6f05057"


def test_siblings_are_taught_different_mistakes():
    """The premise built into the family: the learner has a wrap-around blind spot, the explorer slips."""
    spec = FamilySpec()
    assert spec.learner.tutor.wrap_error_rate > 0.5 and spec.learner.tutor.slip_rate < spec.explorer.tutor.slip_rate
    assert spec.explorer.tutor.wrap_error_rate == 0.0
    assert spec.explorer.model.hidden_size < spec.learner.model.hidden_size
