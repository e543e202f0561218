"""Where each step's prompts come from, and which pushed prompts may feed a
step. A task family generates prompts from a seed (no I/O); pushed prompts
are read from Redis by the service and handed in; a dataset file is read
here, once, under the deployment's datasets directory (bounded, see
``shared.datasets``) and kept for the experiment while it runs.

With ``task.chat`` (or a prompt given as messages) every prompt handed out
carries the chat turns the rollout renders with the model's template
(``chat_prompt``)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from services.scheduler import spec as spec_rules
from services.scheduler.spec import SpecLimits
from services.scheduler.state import ExperimentView
from shared import datasets
from shared.messages import ChatFormat, ChatMessage, DatasetSource, ExperimentSpec, Prompt

EVAL_SEED = 0  # every experiment of a family is measured on the same held-out prompts
STEP_SEED_STRIDE = 100_000  # > spec.MAX_STEPS: (seed, step) -> a distinct generator seed
EVAL_PROMPT_CACHE_SIZE = 8  # (family, eval_size) lists kept; more are generated again
MAX_ID_CHARS = 128  # an invalid id is still named in its event, cut to this length
MAX_LISTED_PROMPT_IDS = 5  # prompt ids named in one event
DATASET_CACHE_SIZE = 16  # experiments' datasets kept read (>= running ones, or they are read again)


class ExperimentFailure(Exception):
    """Something about one experiment that cannot work (e.g. its family cannot
    produce enough prompts); the experiment fails, the service goes on."""


class PromptSource:
    """The prompts of a step and the held-out prompts of an experiment.
    ``datasets_root``: where ``task.dataset`` paths live (None: dataset tasks fail)."""

    def __init__(self, datasets_root: Path | None = None, limits: SpecLimits = SpecLimits()) -> None:
        self.datasets_root = datasets_root
        self.limits = limits
        self._families: dict[str, Any] = {}
        # (family, size) -> held-out prompts, shared by all; least recently used dropped first
        self._eval_cache: OrderedDict[tuple[str | None, int], list[Prompt]] = OrderedDict()
        # (encoded DatasetSource, experiment id) -> rows read; least recently used dropped first
        self._datasets: OrderedDict[tuple[bytes, str], datasets.DatasetSplit] = OrderedDict()

    def available(self, view: ExperimentView, step: int) -> bool:
        """Are step ``step``'s prompts there (only pushed prompts can be missing)?"""
        if not view.spec.task.stream:
            return True
        return len(view.stream_prompts) >= prompts_needed(view.spec, step)

    def train(self, view: ExperimentView, step: int) -> list[Prompt]:
        """Step ``s``'s prompts (``ExperimentFailure`` when they cannot be had)."""
        return [chat_prompt(view.spec.task.chat, p) for p in self._train(view, step)]

    def held_out(self, view: ExperimentView) -> list[Prompt]:
        """The prompts that measure the experiment's held-out accuracy."""
        return [chat_prompt(view.spec.task.chat, p) for p in self._held_out(view)]

    def held_out_size(self, view: ExperimentView) -> int:
        """``spec.held_out_size``, with a dataset's held-out rows counted."""
        spec = view.spec
        if spec.task.dataset is None:
            return spec_rules.held_out_size(spec)
        return spec_rules.held_out_size(spec, len(self._dataset(view).held_out))

    def _train(self, view: ExperimentView, step: int) -> list[Prompt]:
        """Streamed: pushed prompts are consumed in order, each once (after
        the held-out ones); inline: the training split, cycled; dataset: the
        training rows in the spec's order; family: generated from (seed, step)."""
        spec = view.spec
        count = spec.prompts_per_step
        if spec.task.stream:
            first = spec_rules.held_out_size(spec) + step * count
            return view.stream_prompts[first:first + count]
        if spec.task.prompts is not None:
            pool, _ = spec_rules.split_inline_prompts(spec)
            return [pool[(step * count + i) % len(pool)] for i in range(count)]
        if (source := spec.task.dataset) is not None:
            return datasets.step_prompts(self._dataset(view).train, source.order, source.seed, step, count)
        return self._generate(spec.task.family, spec.seed * STEP_SEED_STRIDE + step, count, "train")

    def _held_out(self, view: ExperimentView) -> list[Prompt]:
        spec = view.spec
        if spec.task.stream:
            return view.stream_prompts[:spec_rules.held_out_size(spec)]
        if spec.task.prompts is not None:
            return spec_rules.split_inline_prompts(spec)[1]
        if spec.task.dataset is not None:
            return self._dataset(view).held_out[:self.held_out_size(view)]
        key = (spec_rules.eval_family(spec), spec.eval_size)
        if key in self._eval_cache:
            self._eval_cache.move_to_end(key)
        else:
            self._eval_cache[key] = self._generate(key[0], EVAL_SEED, spec.eval_size, "eval")
            while len(self._eval_cache) > EVAL_PROMPT_CACHE_SIZE:
                self._eval_cache.popitem(last=False)
        return self._eval_cache[key]

    def _dataset(self, view: ExperimentView) -> datasets.DatasetSplit:
        """The split of ``view``'s dataset, read once (again after a restart,
        or when more experiments' datasets were read since)."""
        source = view.spec.task.dataset
        assert source is not None  # only called for dataset tasks
        key = (msgspec.json.encode(source), view.experiment_id)
        if key not in self._datasets:
            self._datasets[key] = self._read_dataset(view.spec, source)
            while len(self._datasets) > DATASET_CACHE_SIZE:
                self._datasets.popitem(last=False)
        self._datasets.move_to_end(key)
        return self._datasets[key]

    def _read_dataset(self, spec: ExperimentSpec, source: DatasetSource) -> datasets.DatasetSplit:
        if self.datasets_root is None:
            raise ExperimentFailure("task.dataset: this deployment has no datasets directory")
        try:
            rows = datasets.read_rows(self.datasets_root, source)
            prompts = [datasets.row_prompt(row, source) for row in rows]
            for row, prompt in zip(rows, prompts, strict=True):
                if (problem := spec_rules.pushed_prompt_problem(prompt, spec, self.limits)) is not None:
                    raise datasets.DatasetError(f"row {row.number}: the prompt {problem}")
            if not prompts:
                raise datasets.DatasetError("no rows")
            return datasets.split_dataset(prompts, source.held_out, source.seed)
        except datasets.DatasetError as exc:
            raise ExperimentFailure(f"task.dataset {source.path!r}: {exc}") from exc

    def _family(self, name: str):
        if name not in self._families:
            from shared.tasks import get_family

            self._families[name] = get_family(name)
        return self._families[name]

    def _generate(self, family: str | None, seed: int, count: int, split: str) -> list[Prompt]:
        try:
            if family is None:  # a spec that passed validation always names one
                raise KeyError("no family named")
            return self._family(family).generate(seed, count, split)
        except (KeyError, ValueError) as exc:
            raise ExperimentFailure(f"task family {family!r} cannot give {count} {split} prompts: {exc}") from exc


def chat_prompt(chat: ChatFormat | None, prompt: Prompt) -> Prompt:
    """``prompt`` as the rollout should render it: with ``chat`` (or messages
    of its own), chat turns (``chat.system`` first when it has no system
    turn) and the thinking switch; ``text`` filled with the last user turn
    when empty (what rewards see as the prompt)."""
    if chat is None and prompt.messages is None:
        return prompt
    messages = list(prompt.messages) if prompt.messages is not None else [ChatMessage(role="user", content=prompt.text)]
    if chat is not None and chat.system is not None and not any(m.role == "system" for m in messages):
        messages.insert(0, ChatMessage(role="system", content=chat.system))
    text = prompt.text or next((m.content for m in reversed(messages) if m.role == "user"), "")
    thinking = chat.enable_thinking if chat is not None and chat.enable_thinking is not None else None
    return msgspec.structs.replace(prompt, text=text, messages=messages,
                                   enable_thinking=prompt.enable_thinking if thinking is None else thinking)


def prompts_needed(spec: ExperimentSpec, step: int) -> int:
    """Pushed prompts a streamed experiment needs before step ``step`` can run."""
    return spec_rules.held_out_size(spec) + (step + 1) * spec.prompts_per_step


def screen_prompts(spec: ExperimentSpec | None, prompts: list[Prompt], known_ids: set[str],
                   limits: SpecLimits) -> tuple[list[Prompt], list[str]]:
    """The prompts that may feed ``spec``'s steps (``None``: spec not known
    yet) in order, and one readable line per kind of prompt left out:
    a ``prompt_id`` already given (a repeated push changes nothing), a
    text that is empty, too long or over the train budget, a missing
    answer that the reward needs."""
    accepted: list[Prompt] = []
    left_out: dict[str, list[str]] = {}
    seen = set(known_ids)
    for prompt in prompts:
        problem = _prompt_problem(spec, prompt, seen, limits)
        if problem is not None:
            left_out.setdefault(problem, []).append(prompt.prompt_id)
            continue
        seen.add(prompt.prompt_id)
        accepted.append(prompt)
    return accepted, [_ignored_line(problem, ids) for problem, ids in left_out.items()]


def _prompt_problem(spec: ExperimentSpec | None, prompt: Prompt, seen: set[str], limits: SpecLimits) -> str | None:
    if prompt.prompt_id in seen:
        return "their prompt_id was already given"
    if spec is None:
        problem = spec_rules.prompt_problem(prompt, limits)
    else:
        problem = spec_rules.pushed_prompt_problem(prompt, spec, limits)
    if problem is not None:
        return f"the text {problem}"
    if spec is not None and spec.reward.type == "exact_match" and prompt.answer is None:
        return "they have no answer (reward exact_match needs one)"
    return None


def _ignored_line(problem: str, prompt_ids: list[str]) -> str:
    shown = ", ".join(repr(i[:MAX_ID_CHARS]) for i in prompt_ids[:MAX_LISTED_PROMPT_IDS])
    more = f" and {len(prompt_ids) - MAX_LISTED_PROMPT_IDS} more" if len(prompt_ids) > MAX_LISTED_PROMPT_IDS else ""
    return f"{len(prompt_ids)} pushed prompts ignored: {problem} ({shown}{more})"
