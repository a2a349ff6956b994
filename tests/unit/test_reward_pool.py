"""The reward worker pool: functions loaded by spec, signature checks, time limits, calls side by side."""

import time

import pytest

from megatron_s2l.algo.reward_pool import FunctionPool, check_function
from megatron_s2l.algo.rewards import MathScorer

PATHOLOGICAL = "so \\boxed{9^{9^{9^{9}}}}"  # sympy tries to evaluate the tower: math-verify never returns
MODULE = "tests.unit.user_rewards"


def test_calls_of_one_batch_run_side_by_side(tmp_path):
    """Each call waits for the marks of the others: all score 1 only if the three ran at the same time."""
    pool = FunctionPool(timeout_s=60.0, workers=3)
    extra = {"dir": str(tmp_path), "n": 3, "wait_s": 30.0}
    outcomes = pool.run([(f"{MODULE}:rendezvous", {"response": "", "extra": extra})] * 3)
    pool.close()
    assert [o.value for o in outcomes] == [1.0, 1.0, 1.0]


def test_one_worker_runs_the_calls_one_after_another(tmp_path):
    """The control of the test above: with one worker the first call waits alone."""
    pool = FunctionPool(timeout_s=60.0, workers=1)
    extra = {"dir": str(tmp_path), "n": 2, "wait_s": 2.0}
    outcomes = pool.run([(f"{MODULE}:rendezvous", {"response": "", "extra": extra})] * 2)
    pool.close()
    assert [o.value for o in outcomes] == [0.0, 1.0]


def test_n_hanging_calls_cost_one_time_limit_not_n():
    """A hanging call and a pathological math check end the same way (killed at the deadline); sleeping
    instead of computing keeps the measure independent of how busy the machine's CPUs are."""
    timeout_s, n = 3.0, 3
    wall = {}
    for workers in (n, 1):
        pool = FunctionPool(timeout_s=timeout_s, workers=workers)
        warm = pool.run([(f"{MODULE}:hangs", {"response": "fine"})] * n)  # starts the workers, loads the module
        assert [o.value for o in warm] == [1.0] * n
        start = time.monotonic()
        outcomes = pool.run([(f"{MODULE}:hangs", {"response": "hang"})] * n)
        wall[workers] = time.monotonic() - start
        assert all(o.timed_out for o in outcomes)
        pool.close()
    assert wall[n] < 2 * timeout_s  # side by side: about one time limit
    assert wall[1] >= n * timeout_s  # one worker: one time limit per call


def test_pathological_answers_time_out_in_the_pool_and_keep_their_places():
    scorer = MathScorer(timeout_s=2.0, workers=3)
    # quick_match decides the plain numbers in-process; the power towers go to the pool and run out of time
    responses = [PATHOLOGICAL, "\\boxed{2}", "\\boxed{3}", PATHOLOGICAL, "\\boxed{\\frac{4}{2}}", PATHOLOGICAL]
    assert scorer.verdicts(responses, ["1", "2", "2", "1", "2", "1"]) == [None, True, False, None, True, None]
    scorer.close()


def test_a_hanging_call_times_out_and_the_worker_is_replaced():
    pool = FunctionPool(timeout_s=1.0, workers=1)
    spec = f"{MODULE}:hangs"
    outcomes = pool.run([(spec, {"response": "hang"}), (spec, {"response": "fine"})])
    assert [(o.value, o.timed_out) for o in outcomes] == [(None, True), (1.0, False)]
    pool.close()


def test_a_function_that_prints_does_not_disturb_the_replies(capfd):
    pool = FunctionPool(timeout_s=30.0, workers=1)
    outcomes = pool.run([(f"{MODULE}:prints", {"response": "a"}), (f"{MODULE}:prints", {"response": "b"})])
    pool.close()
    assert [o.value for o in outcomes] == [1.0, 1.0]
    assert "scoring 'a'\nscoring 'b'\n" in capfd.readouterr().err


def test_a_raising_call_returns_its_traceback():
    pool = FunctionPool(timeout_s=30.0, workers=1)
    [outcome] = pool.run([(f"{MODULE}:raises", {"response": "boom"})])
    assert "ValueError: cannot score 'boom'" in outcome.error and "user_rewards.py" in outcome.error
    pool.close()


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "is not 'package.module:function'"),
    (f"{MODULE}:missing", "'missing' in tests.unit.user_rewards is not found"),
    (f"{MODULE}:time", "'time' in tests.unit.user_rewards is a module, not a function"),
    ("tests.unit.no_such_module:f", "no module 'tests.unit.no_such_module'"),
    ("no/such/file.py:f", "file .*no/such/file.py not found"),
    (f"{MODULE}:needs_a_tokenizer", r"requires \['tokenizer'\], which the scorer does not pass"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        check_function(spec)


def test_a_file_that_fails_to_import_shows_its_traceback(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_package_anywhere\n")
    with pytest.raises(ValueError, match="(?s)importing .*broken.py failed.*no_such_package_anywhere"):
        check_function(f"{broken}:reward")
