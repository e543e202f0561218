"""The rollout service's prompt token-id cache: same ids as encoding every
time, each distinct prompt encoded once, bounded in entries and prompt size."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.rollout.service import PromptIdCache, prompt_token_ids
from shared.messages import ChatMessage, Prompt

TINY_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "clora-tiny"


class CountingTokenizer:
    """The tiny model's tokenizer, counting encodes."""

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        self.inner = AutoTokenizer.from_pretrained(TINY_MODEL)
        self.encodes = 0

    def encode(self, text, **kwargs):
        self.encodes += 1
        return self.inner.encode(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def tokenizer() -> CountingTokenizer:
    return CountingTokenizer()


def test_cached_ids_are_the_encoded_ids_and_each_prompt_is_encoded_once(tokenizer):
    cache = PromptIdCache()
    prompts = [Prompt(prompt_id=f"p{i}", text=f"{i}+{i}=") for i in range(5)]
    before = tokenizer.encodes
    first = [cache.token_ids(tokenizer, p) for p in prompts]
    again = [cache.token_ids(tokenizer, p) for p in prompts]
    assert first == again == [prompt_token_ids(tokenizer.inner, p) for p in prompts]
    assert tokenizer.encodes - before == 5
    again[0].append(99)  # a caller's list is its own: the cache is not changed through it
    assert cache.token_ids(tokenizer, prompts[0]) == first[0]


def test_the_cache_keeps_at_most_its_entries_least_recently_used_out_first(tokenizer):
    cache = PromptIdCache(entries=2)
    a, b, c = (Prompt(prompt_id=x, text=x * 3) for x in "abc")
    for prompt in (a, b, a, c):  # a used again: b is the oldest when c comes
        cache.token_ids(tokenizer, prompt)
    before = tokenizer.encodes
    cache.token_ids(tokenizer, a)
    cache.token_ids(tokenizer, c)
    assert tokenizer.encodes == before
    cache.token_ids(tokenizer, b)
    assert tokenizer.encodes == before + 1


def test_long_prompts_are_encoded_every_time(tokenizer):
    cache = PromptIdCache(max_chars=10)
    long_prompt = Prompt(prompt_id="long", text="1234567890+1=")
    before = tokenizer.encodes
    assert cache.token_ids(tokenizer, long_prompt) == cache.token_ids(tokenizer, long_prompt)
    assert tokenizer.encodes == before + 2


def test_chat_prompts_are_keyed_by_their_turns_not_only_their_text(tokenizer):
    cache = PromptIdCache()
    one = Prompt(prompt_id="x", text="", messages=[ChatMessage(role="user", content="1+1=")])
    other = Prompt(prompt_id="x", text="", messages=[ChatMessage(role="user", content="2+2=")])
    assert cache._key(one) != cache._key(other)
    assert cache._key(one) == cache._key(Prompt(prompt_id="y", text="", messages=list(one.messages or [])))
