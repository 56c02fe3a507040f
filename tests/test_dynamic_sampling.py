"""DAPO / verl dynamic sampling (selector `dynamic`): flat groups are dropped
and further batches are drawn until the batch is full."""

from cropi.curriculum.sampling import mixed_groups, sample_step
from cropi.data.types import Prompt
from cropi.rollout.base import Trajectory
from cropi.spec import parse_spec


def test_mixed_groups_drops_the_groups_whose_rewards_are_all_equal():
    groups = [["a"], ["b"], ["c"], ["d"]]
    rewards = [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    kept, kept_rewards = mixed_groups(groups, rewards)
    assert kept == [["b"], ["d"]] and kept_rewards == [[0.0, 1.0], [1.0, 0.0]]


class ScriptedEngine:
    """Answers each prompt text with a fixed list of responses (stands in for sampling)."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, n, sampling):
        self.calls.append((list(prompts), sampling.seed))
        return [[Trajectory([1], [2], [0.0], text, True) for text in self.answers[p][:n]] for p in prompts]


def prompt(name):
    return Prompt(id=name, text=name, answer="1")


def spec(selector, batch=2, draws=3):
    return parse_spec({"rollout": {"n": 2}, "rl": {"batch_prompts": batch},
                       "curriculum": {"selector": selector, "dynamic_max_draws": draws}})


ANSWERS = {"solved": ["1", "1"], "failed": ["0", "0"], "mixed1": ["1", "0"], "mixed2": ["0", "1"],
           "mixed3": ["1", "0"]}
BATCHES = [[prompt("solved"), prompt("mixed1")], [prompt("failed"), prompt("failed")],
           [prompt("mixed2"), prompt("mixed3")]]


def test_dynamic_refills_the_batch_with_mixed_groups_from_further_draws():
    engine = ScriptedEngine(ANSWERS)
    groups, rewards, draws = sample_step(spec("dynamic"), engine, step=1, draw=lambda i: BATCHES[i])
    assert draws == 3
    assert [g[0].text + g[1].text for g in groups] == ["10", "01"]  # mixed1, then mixed2; mixed3 is surplus
    assert rewards == [[1.0, 0.0], [0.0, 1.0]]
    # Each draw has its own rollout seed.
    assert len({seed for _, seed in engine.calls}) == 3


def test_dynamic_stops_drawing_once_the_batch_is_full():
    engine = ScriptedEngine(ANSWERS)
    _, _, draws = sample_step(spec("dynamic", batch=1), engine, step=1, draw=lambda i: BATCHES[i])
    assert draws == 1 and len(engine.calls) == 1


def test_dynamic_trains_on_the_last_batch_when_no_group_is_mixed():
    engine = ScriptedEngine(ANSWERS)
    flat = [[prompt("solved"), prompt("failed")]] * 2
    groups, rewards, draws = sample_step(spec("dynamic", draws=2), engine, step=1, draw=lambda i: flat[i])
    assert draws == 2 and rewards == [[1.0, 1.0], [0.0, 0.0]]


def test_other_selectors_sample_one_batch_unfiltered():
    engine = ScriptedEngine(ANSWERS)
    groups, rewards, draws = sample_step(spec("random"), engine, step=1, draw=lambda i: BATCHES[i])
    assert draws == 1 and rewards == [[1.0, 1.0], [1.0, 0.0]]
