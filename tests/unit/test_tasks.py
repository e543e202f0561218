"""Task families: deterministic generation, disjoint splits, strict verifiers."""

from __future__ import annotations

import pytest

from shared.tasks import FAMILIES, PRETRAIN_FAMILIES, get_family, split_of

ALL_FAMILIES = sorted(FAMILIES)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_generation_is_deterministic_by_seed(name):
    family = get_family(name)
    assert family.generate(7, 20) == family.generate(7, 20)
    assert family.generate(7, 20) != family.generate(8, 20)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_train_and_eval_splits_are_disjoint(name):
    family = get_family(name)
    train = {p.text for seed in range(5) for p in family.generate(seed, 100, "train")}
    held_out = {p.text for seed in range(5) for p in family.generate(seed, 100, "eval")}
    assert train and held_out
    assert not train & held_out
    assert all(split_of(text) == "eval" for text in held_out)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_prompts_are_short_distinct_and_answered(name):
    prompts = get_family(name).generate(0, 50, "eval")
    assert len({p.text for p in prompts}) == 50
    assert len({p.prompt_id for p in prompts}) == 50
    assert all(len(p.text) <= 20 and p.answer and len(p.answer) <= 8 for p in prompts)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        get_family("add").generate(0, 3, "test")


@pytest.mark.parametrize(
    ("name", "instance", "prompt_text", "answer"),
    [
        ("add", (57, 68), "57+68=", "125"),
        ("sub", (52, 38), "52-38=", "14"),
        ("reverse", ("abcd",), "rev:abcd=", "dcba"),
        ("sort", ("dbca",), "sort:dbca=", "abcd"),
        ("sort_desc", ("dbca",), "sort:dbca=", "dcba"),
    ],
)
def test_prompt_and_answer_of_an_instance(name, instance, prompt_text, answer):
    family = get_family(name)
    assert family.format_prompt(instance) == prompt_text
    assert family.solve(instance) == answer


@pytest.mark.parametrize("name", ["add", "sub"])
def test_generated_arithmetic_answers_are_right(name):
    for prompt in get_family(name).generate(1, 50, "train"):
        a, b = (int(x) for x in prompt.text.rstrip("=").replace("-", "+").split("+"))
        assert int(prompt.answer) == (a + b if name == "add" else a - b) >= 0


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_verifier_accepts_right_and_rejects_wrong(name):
    family = get_family(name)
    for prompt in family.generate(3, 20, "eval"):
        assert family.verify(prompt.answer, prompt.answer)
        assert family.verify(f"  {prompt.answer}\nanything after", prompt.answer)
        assert not family.verify(prompt.answer + "1", prompt.answer)
        assert not family.verify("", prompt.answer)


@pytest.mark.parametrize(
    ("name", "completion", "expected"),
    [
        ("add", "125", "125"),
        ("add", " 125 \n", "125"),
        ("add", "12a", None),
        ("add", "-5", None),
        ("add", "", None),
        ("sub", "014", "014"),
        ("reverse", "dcba\nxyz", "dcba"),
        ("reverse", "dcba</s><pad>", "dcba"),
        ("add", "125<|endoftext|>", "125"),
        ("reverse", "dc ba", None),
        ("sort", "ABC", None),
        ("sort", "abc", "abc"),
    ],
)
def test_extract(name, completion, expected):
    assert get_family(name).extract(completion) == expected


def test_malformed_completion_never_verifies():
    add = get_family("add")
    assert not add.verify("one hundred", "100")
    assert not add.verify("100 apples", "100")
    assert not get_family("sort").verify("a b c", "abc")


def test_sort_desc_shares_prompts_with_sort():
    ascending = get_family("sort").generate(5, 30, "eval")
    descending = get_family("sort_desc").generate(5, 30, "eval")
    assert [p.text for p in ascending] == [p.text for p in descending]
    assert all(d.answer == a.answer[::-1] for a, d in zip(ascending, descending, strict=True))


def test_get_family_names_the_known_families():
    with pytest.raises(KeyError, match="add"):
        get_family("multiply")
    assert set(PRETRAIN_FAMILIES) <= set(FAMILIES)
