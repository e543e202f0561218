"""Every rule of ``services.scheduler.spec`` with the reason it gives."""

from __future__ import annotations

import msgspec
import pytest

from services.scheduler.spec import (
    SpecFileError,
    SpecInvalid,
    SpecLimits,
    check_spec,
    convert_spec,
    eval_family,
    load_spec_file,
    parse_spec_text,
    validate_spec,
)
from shared.messages import ExperimentSpec, Prompt, RewardSpec, TaskSource

FAMILIES = ("add", "sub", "sort")
LIMITS = SpecLimits(deployment_rank=8, max_tokens_limit=256)


def spec(**overrides) -> ExperimentSpec:
    fields = dict(experiment_id="exp-1", task=TaskSource(family="add"), reward=RewardSpec(type="family", family="add"))
    fields.update(overrides)
    return ExperimentSpec(**fields)


def reasons(s: ExperimentSpec) -> list[str]:
    return validate_spec(s, LIMITS, FAMILIES)


def test_a_default_spec_is_valid():
    assert reasons(spec()) == []
    check_spec(spec(), LIMITS, FAMILIES)  # does not raise


def test_the_real_task_families_are_the_default_known_ones():
    from shared.tasks import FAMILIES as REAL

    name = next(iter(REAL))
    assert validate_spec(spec(task=TaskSource(family=name), reward=RewardSpec(type="family", family=name))) == []
    assert "task.family: unknown family 'nope'" in validate_spec(spec(task=TaskSource(family="nope")))[0]


PROMPTS = [Prompt(prompt_id="a", text="1+1=", answer="2")]

CASES = [
    # (overrides, the reason's start)
    (dict(experiment_id="Bad ID!"), "experiment_id: 'Bad ID!' must match"),
    (dict(experiment_id="x" * 65), "experiment_id: "),
    (dict(experiment_id="ok\n"), "experiment_id: 'ok\\n' must match"),  # `$` alone would let it through
    (dict(experiment_id="victim:s0"), "experiment_id: 'victim:s0' must match"),
    (dict(experiment_id="../x"), "experiment_id: '../x' must match"),
    (dict(experiment_id="tk-0123"), "experiment_id: 'tk-0123' starts with 'tk-'"),  # the Tinker gateway's runs
    (dict(task=TaskSource()), "task: give exactly one of family, prompts, stream, dataset (got none)"),
    (dict(task=TaskSource(family="add", prompts=PROMPTS)), "task: give exactly one of family, prompts, stream, dataset "
                                                           "(got family and prompts)"),
    (dict(task=TaskSource(family="add", stream=True)), "task: give exactly one"),
    (dict(task=TaskSource(family="poetry")), "task.family: unknown family 'poetry' (known: add, sort, sub)"),
    (dict(task=TaskSource(prompts=[])), "task.prompts: the list is empty"),
    (dict(task=TaskSource(prompts=[Prompt(prompt_id="a", text="")])), "task.prompts: prompt 0 has an empty text"),
    (dict(task=TaskSource(prompts=PROMPTS), reward=RewardSpec(type="family")),
     "reward.family: required for reward type 'family'"),
    (dict(reward=RewardSpec(type="family", family="poetry")), "reward.family: unknown family 'poetry'"),
    (dict(reward=RewardSpec(type="regex")), "reward.pattern: required for reward type 'regex'"),
    (dict(reward=RewardSpec(type="regex", pattern="(unclosed")),
     "reward.pattern: not supported by the linear-time matcher (RE2): missing )"),
    (dict(reward=RewardSpec(type="regex", pattern=r"(a)\1")),  # a backreference: no linear-time matching
     "reward.pattern: not supported by the linear-time matcher (RE2)"),
    (dict(reward=RewardSpec(type="regex", pattern="a" * 1001)), "reward.pattern: longer than 1000 characters"),
    (dict(reward=RewardSpec(type="http")), "reward.url: reward type 'http' needs an http:// or https:// url"),
    (dict(reward=RewardSpec(type="http", url="ftp://x")), "reward.url: "),
    (dict(reward=RewardSpec(type="worker")), "reward.worker: reward type 'worker' needs a worker name"),
    (dict(reward=RewardSpec(type="worker", worker="a b")), "reward.worker: "),
    (dict(reward=RewardSpec(type="worker", worker="judge\n")), "reward.worker: "),
    (dict(task=TaskSource(prompts=[Prompt(prompt_id="a", text="hi")]), reward=RewardSpec(type="exact_match")),
     "reward.type: 'exact_match' needs an answer for every prompt (task.prompts[0] has none)"),
    (dict(reward=RewardSpec(type="family", family="add", timeout_s=0)), "reward.timeout_s: must be > 0"),
    (dict(reward=RewardSpec(type="family", family="add", max_attempts=0)), "reward.max_attempts: must be >= 1"),
    (dict(steps=0), "steps: must be between 1 and"),
    (dict(group_size=1), "group_size: must be between 2 and"),
    (dict(prompts_per_step=0), "prompts_per_step: must be between 1 and"),
    (dict(max_tokens=0), "max_tokens: must be between 1 and 256"),
    (dict(max_tokens=257), "max_tokens: must be between 1 and 256 (got 257)"),
    (dict(temperature=-0.1), "temperature: must be >= 0"),
    (dict(temperature=float("nan")), "temperature: must be >= 0"),
    (dict(top_p=0.0), "top_p: must be in (0, 1]"),
    (dict(top_k=-1), "top_k: must be >= 0"),
    (dict(learning_rate=0.0), "learning_rate: must be in (0, 1) (got 0.0)"),
    (dict(learning_rate=1.0), "learning_rate: must be in (0, 1)"),
    (dict(learning_rate=float("nan")), "learning_rate: must be in (0, 1)"),
    (dict(lora_rank=16), "lora_rank: 16 is over the deployment's rank 8"),
    (dict(lora_rank=0), "lora_rank: must be >= 1"),
    (dict(lora_alpha=0.0), "lora_alpha: must be a finite number > 0 (got 0.0)"),
    (dict(lora_alpha=float("inf")), "lora_alpha: must be a finite number > 0"),
    (dict(lora_targets=["q_proj", "lm_head"]), "lora_targets: ['lm_head'] are not among the deployment's"),
    (dict(lora_targets=["q_proj", "q_proj"]), "lora_targets: ['q_proj'] repeated;"),
    (dict(lora_targets=[]), "lora_targets: empty; give some of the deployment's target modules"),
    (dict(max_off_policy_steps=-1), "max_off_policy_steps: must be between 0 and"),
    (dict(kl_coef=-1.0), "kl_coef: must be >= 0"),
    (dict(clip_eps=0.0), "clip_eps: must be in (0, 1)"),
    (dict(max_grad_norm=0.0), "max_grad_norm: must be > 0"),
    (dict(eval_size=-1), "eval_size: must be between 0 and"),
    (dict(checkpoint_every=0), "checkpoint_every: must be >= 1"),
    (dict(seed=-3), "seed: must be >= 0"),
]


@pytest.mark.parametrize("overrides, expected", CASES, ids=[c[1].split(":")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_each_rule_names_its_field(overrides, expected):
    found = reasons(spec(**overrides))
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_every_broken_rule_is_reported_at_once():
    with pytest.raises(SpecInvalid) as caught:
        check_spec(spec(steps=0, lora_rank=99, temperature=-1.0), LIMITS, FAMILIES)
    assert [r.split(":")[0] for r in caught.value.reasons] == ["steps", "temperature", "lora_rank"]
    assert "lora_rank: 99 is over" in str(caught.value)


def test_valid_variants():
    assert reasons(spec(task=TaskSource(prompts=PROMPTS), reward=RewardSpec(type="exact_match"))) == []
    assert reasons(spec(task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"))) == []
    assert reasons(spec(reward=RewardSpec(type="family"))) == []  # the task's family scores it
    assert reasons(spec(reward=RewardSpec(type="regex", pattern=r"^\d+$"))) == []
    assert reasons(spec(reward=RewardSpec(type="http", url="http://127.0.0.1:8088/score"))) == []
    assert reasons(spec(reward=RewardSpec(type="worker", worker="judge-1"))) == []
    assert reasons(spec(temperature=0.0, lora_rank=8, max_tokens=256, eval_size=0)) == []
    # each experiment's own LoRA shape: a rank up to the deployment's, an alpha, a subset of its targets
    assert reasons(spec(lora_rank=2, lora_alpha=4.0, lora_targets=["v_proj", "q_proj"])) == []
    assert reasons(spec(lora_rank=1, lora_targets=["down_proj"])) == []
    narrow = SpecLimits(deployment_rank=8, max_tokens_limit=256, deployment_targets=("q_proj", "v_proj"))
    assert check_spec(spec(lora_targets=["v_proj"]), narrow, FAMILIES) is None
    with pytest.raises(SpecInvalid, match="lora_targets: \\['o_proj'\\] are not among"):
        check_spec(spec(lora_targets=["o_proj"]), narrow, FAMILIES)


def test_eval_family():
    assert eval_family(spec()) == "add"
    assert eval_family(spec(task=TaskSource(prompts=PROMPTS), reward=RewardSpec(type="family", family="sub"))) == "sub"
    assert eval_family(spec(task=TaskSource(prompts=PROMPTS), reward=RewardSpec(type="exact_match"))) is None


# ---------------------------------------------------------------- spec files


GOOD_YAML = """\
experiment_id: yaml-1
task: {family: add}
reward: {type: family, family: add}
learning_rate: 3e-3
steps: 5
"""


def test_load_yaml_and_json(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(GOOD_YAML)
    loaded = load_spec_file(path)
    assert (loaded.experiment_id, loaded.learning_rate, loaded.steps) == ("yaml-1", 3e-3, 5)
    as_json = tmp_path / "spec.json"
    as_json.write_text(msgspec.json.encode(loaded).decode())
    assert load_spec_file(as_json) == loaded


def test_inline_prompts_get_ids():
    data = {"experiment_id": "p", "task": {"prompts": [{"text": "1+1=", "answer": "2"}]},
            "reward": {"type": "exact_match"}}
    assert convert_spec(data).task.prompts[0].prompt_id == "p0"


@pytest.mark.parametrize("text, expected", [
    ("experiment_id: [unclosed\n", "spec.yaml: does not parse"),
    ("- a\n- b\n", "spec.yaml: expected a mapping of spec fields, got list"),
    ("experiment_id: x\ntask: {family: add}\n", "spec.yaml: spec: missing required field `reward`"),
    ("experiment_id: x\ntask: {family: add}\nreward: {}\n", "spec.yaml: reward: missing required field `type`"),
    ("experiment_id: x\ntask: {family: add}\nreward: {type: family}\nsteps: many\n",
     "spec.yaml: steps: expected `int`, got `str`"),
    ("experiment_id: x\ntask: {family: add}\nreward: {type: telepathy}\n",
     "spec.yaml: reward.type: unknown reward type 'telepathy' (known: family, exact_match, regex, http, worker, "
     "math, format, sum)"),
    ("experiment_id: x\ntask: {family: add}\nreward: {type: family}\nbogus: 1\n",
     "spec.yaml: spec: contains unknown field `bogus`"),
])
def test_spec_file_errors_are_clear(tmp_path, text, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecFileError) as caught:
        load_spec_file(path)
    assert str(caught.value).startswith(str(tmp_path / expected)), str(caught.value)


def test_unreadable_and_bad_json_files(tmp_path):
    with pytest.raises(SpecFileError, match="cannot read"):
        load_spec_file(tmp_path / "absent.yaml")
    path = tmp_path / "spec.json"
    path.write_text("{not json")
    with pytest.raises(SpecFileError, match="spec.json: does not parse"):
        load_spec_file(path)


def test_yaml_reads_exponent_floats():
    assert parse_spec_text("lr: 1e-2\nn: 3\nx: 2.5E+1\n") == {"lr": 0.01, "n": 3, "x": 25.0}


# ---------------------------------------------------------------- what a spec may cost


def test_reward_cost_is_bounded_by_the_deployment():
    limits = SpecLimits(deployment_rank=8, max_reward_timeout_s=30.0, max_reward_attempts=4, max_reward_budget_s=60.0)

    def refusal(**reward) -> list[str]:
        return validate_spec(spec(reward=RewardSpec(type="http", url="http://r/score", **reward)), limits, FAMILIES)

    assert refusal(timeout_s=30.0, max_attempts=2) == []  # 60 s in all: exactly the budget
    assert refusal(timeout_s=31.0) == ["reward.timeout_s: 31.0 is over the deployment's limit of 30.0 s per attempt"]
    assert refusal(max_attempts=5) == ["reward.max_attempts: 5 is over the deployment's limit of 4"]
    assert refusal(timeout_s=20.0, max_attempts=4) == [
        "reward.timeout_s x reward.max_attempts: 20.0 x 4 = 80 s is over the deployment's limit of 60 s per group"]


def test_limits_come_from_the_scheduler_config():
    from services.scheduler.spec import limits_from_config
    from shared.config import SchedulerConfig

    config = SchedulerConfig(lora_rank=16, max_train_tokens=5000, max_packed_row_tokens=700, max_reward_timeout_s=3.0,
                             max_reward_attempts=2, max_reward_budget_s=5.0, lora_targets="q_proj, v_proj")
    limits = limits_from_config(config)
    assert (limits.deployment_rank, limits.max_train_tokens, limits.max_packed_row_tokens) == (16, 5000, 700)
    assert limits.deployment_targets == ("q_proj", "v_proj")
    assert (limits.max_reward_timeout_s, limits.max_reward_attempts, limits.max_reward_budget_s) == (3.0, 2, 5.0)


BUDGET = SpecLimits(deployment_rank=8, max_train_tokens=10_000, max_packed_row_tokens=1000)


def test_a_packed_group_over_the_trainers_row_budget_is_refused_with_the_numbers():
    # a family prompt is bounded by FAMILY_PROMPT_BYTES_BOUND (64): 64 + 8 x 117 = 1000 fits, 8 x 118 does not
    assert validate_spec(spec(group_size=8, max_tokens=117, prompts_per_step=1), BUDGET, FAMILIES) == []
    assert validate_spec(spec(group_size=8, max_tokens=118, prompts_per_step=1), BUDGET, FAMILIES) == [
        "group_size x max_tokens: a packed group of prompt <= 64 + group_size 8 x max_tokens 118 = 1008 tokens "
        "is over the trainer's max_packed_row_tokens 1000"]


def test_a_train_job_over_the_trainers_token_budget_is_refused_with_the_numbers():
    text = "x" * 36  # inline prompts: their own length in bytes bounds their tokens
    prompts = [Prompt(prompt_id="a", text="1+1=", answer="2"), Prompt(prompt_id="b", text=text, answer="3")]
    ok = spec(task=TaskSource(prompts=prompts), reward=RewardSpec(type="exact_match"), group_size=4, max_tokens=16)
    assert validate_spec(msgspec.structs.replace(ok, prompts_per_step=100), BUDGET, FAMILIES) == []  # 100 x 100
    assert validate_spec(msgspec.structs.replace(ok, prompts_per_step=101), BUDGET, FAMILIES) == [
        "prompts_per_step: a train job of prompts_per_step 101 x (prompt <= 36 + group_size 4 x max_tokens 16 "
        "= 100 tokens) = 10100 tokens is over the trainer's max_train_tokens 10000"]


def test_prompt_text_length_is_bounded_inline_and_pushed():
    from services.scheduler.spec import MAX_PROMPT_CHARS, pushed_prompt_problem

    long_prompt = Prompt(prompt_id="long", text="y" * (MAX_PROMPT_CHARS + 1), answer="1")
    found = reasons(spec(task=TaskSource(prompts=[long_prompt]), reward=RewardSpec(type="exact_match")))
    assert found[0] == (f"task.prompts: prompt 0 is {MAX_PROMPT_CHARS + 1} characters long, "
                        f"over the limit of {MAX_PROMPT_CHARS}")
    streamed = spec(task=TaskSource(stream=True), reward=RewardSpec(type="exact_match"), group_size=8,
                    max_tokens=100, prompts_per_step=4)
    assert validate_spec(streamed, BUDGET, FAMILIES) == []
    # a pushed prompt must leave room for its group: 1000 - 8 x 100 = 200 bytes at most
    assert pushed_prompt_problem(Prompt(prompt_id="a", text="é" * 100), streamed, BUDGET) is None  # 200 bytes
    assert pushed_prompt_problem(Prompt(prompt_id="a", text="é" * 100 + "z"), streamed, BUDGET) == (
        "is 201 bytes long; behind group_size 8 x max_tokens 100 the train job would exceed the trainer's budget "
        "(at most 200 bytes a prompt)")
    assert pushed_prompt_problem(long_prompt, streamed, SpecLimits()) .startswith("is 8193 characters long")
    assert pushed_prompt_problem(Prompt(prompt_id="e", text=""), streamed, BUDGET) == "has an empty text"


def test_every_built_in_family_stays_under_its_prompt_bound():
    from services.scheduler.spec import FAMILY_PROMPT_BYTES_BOUND
    from shared.tasks import FAMILIES as REAL

    for name, family in REAL.items():
        for split in ("train", "eval"):
            longest = max(len(p.text.encode()) for p in family.generate(0, 200, split))
            assert longest <= FAMILY_PROMPT_BYTES_BOUND, (name, split, longest)
