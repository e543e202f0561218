"""Chat prompts: a prompt given as chat turns is rendered with the model's own
chat template (its generation prompt, a system turn, the thinking switch
where the template has one), exactly as ``tokenizer.apply_chat_template``
renders it; those token ids travel with the completion and are what the
trainer trains on. On the shipped tiny model, an experiment whose prompts
are chat turns learns (separate processes on one embedded Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from services.cli.local import DEMO_ENV, LocalCluster
from services.rollout.service import prompt_token_ids, render_chat
from shared.client import CloraClient
from shared.config import DEFAULT_MODEL_DIR
from shared.engine import EngineError
from shared.messages import ChatFormat, ChatMessage, Completion, ExperimentSpec, Prompt, RewardSpec, TaskSource, decode
from shared.tasks import get_family

RUN_TIMEOUT_S = 400.0
MIN_GAIN = 0.15  # held-out accuracy points gained, at least


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(Path(DEFAULT_MODEL_DIR))


def template_ids(tokenizer, turns: list[dict], **switches) -> list[int]:
    rendered = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, **switches)
    return list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)


def as_prompt(turns: list[dict], **fields) -> Prompt:
    return Prompt(prompt_id="p", messages=[ChatMessage(**turn) for turn in turns], **fields)


def test_chat_turns_are_rendered_exactly_as_the_template_renders_them(tokenizer):
    turns = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="},
             {"role": "assistant", "content": "3"}, {"role": "user", "content": "57+68="}]
    ids = prompt_token_ids(tokenizer, as_prompt(turns))
    assert ids == template_ids(tokenizer, turns)
    assert tokenizer.decode(ids) == "add\n1+2=3</s>57+68="
    lone = [{"role": "user", "content": "57+68="}]  # the tiny template: a lone user turn is the bare prompt
    assert prompt_token_ids(tokenizer, as_prompt(lone)) == tokenizer.encode("57+68=", add_special_tokens=False)
    assert prompt_token_ids(tokenizer, Prompt(prompt_id="t", text="57+68=")) == tokenizer.encode("57+68=")


def test_the_thinking_switch_reaches_a_template_that_has_one(tokenizer):
    thinking = tokenizer.__class__.from_pretrained(Path(DEFAULT_MODEL_DIR))
    thinking.chat_template = ("{%- for m in messages -%}{{ m['content'] }}{%- endfor -%}"
                              "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking -%}"
                              "{{ ' nothink:' }}{%- endif -%}")
    turns = [{"role": "user", "content": "1+1="}]
    assert render_chat(thinking, as_prompt(turns, enable_thinking=False)) == "1+1= nothink:"
    assert render_chat(thinking, as_prompt(turns)) == "1+1="
    assert prompt_token_ids(thinking, as_prompt(turns, enable_thinking=False)) == template_ids(
        thinking, turns, enable_thinking=False)
    thinking.chat_template = None
    with pytest.raises(EngineError, match="has no chat template"):
        render_chat(thinking, as_prompt(turns))


@pytest.mark.slow
def test_an_experiment_of_chat_prompts_learns_on_the_ids_the_template_gives(tmp_path, tokenizer, capsys):
    prompts = [Prompt(prompt_id=p.prompt_id, messages=[ChatMessage(role="user", content=p.text)], answer=p.answer)
               for p in get_family("add").generate(0, 192, "train")]
    spec = ExperimentSpec(experiment_id="chat-add", task=TaskSource(prompts=prompts, chat=ChatFormat()),
                          reward=RewardSpec(type="family", family="add"), steps=12, prompts_per_step=8,
                          group_size=16, max_tokens=8, learning_rate=3e-3, eval_size=64)
    with LocalCluster(tmp_path / "cluster", env=DEMO_ENV) as cluster:
        cluster.wait_ready()
        with CloraClient.connect(cluster.url, cluster.stream_prefix) as client:
            client.submit(spec)
            record = client.wait(spec.experiment_id, RUN_TIMEOUT_S)
            entries = client.redis.xrange(client.keys.stream("completions"))
        cluster.check_alive()
    with capsys.disabled():
        print(f"\n{spec.experiment_id}: {record.status}, held-out {record.start_accuracy} -> {record.final_accuracy}")
    assert record.status == "finished" and record.errors == 0, record
    assert record.final_accuracy >= record.start_accuracy + MIN_GAIN, record
    completions = [c for c in (decode(f[b"msg"], "completions") for _, f in entries) if isinstance(c, Completion)]
    assert {c.purpose for c in completions} == {"train", "eval"}
    for result in (r for completion in completions for r in completion.results):
        turns = [{"role": m.role, "content": m.content} for m in result.prompt.messages or []]
        assert turns and result.prompt_token_ids == template_ids(tokenizer, turns), result.prompt.prompt_id
