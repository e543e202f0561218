"""Task families with checkable answers: the built-in RL tasks of C-LoRA.

Each family generates (prompt, answer) pairs deterministically from a seed and
verifies a completion against the answer. Prompts are short (``"57+68="``,
``"rev:abcde="``), answers are short, and the shipped tiny model ends every
answer with its eos token, so decoding stops after a few tokens.

Splits: every instance belongs to exactly one split, decided by a stable hash
of its prompt text (``EVAL_SHARE`` of instances are "eval"), so "train" and
"eval" never share a prompt whatever the seeds. Generation is a pure function
of ``(family, seed, n, split)``.

Families ``add``, ``sub``, ``reverse`` and ``sort`` are the tiny model's
pretraining mix. ``sort_desc`` asks for the opposite order on the very same
prompts as ``sort``: two tenants trained on ``sort`` and ``sort_desc`` are
rewarded for opposite things.
"""

from __future__ import annotations

import random
import re
import string
import zlib

from shared.messages import Prompt

SPLITS = ("train", "eval")
# One instance in 8 is held out for evaluation.
EVAL_SHARE_DENOMINATOR = 8
# Generation gives up after this many draws per requested prompt (tiny spaces).
MAX_DRAWS_PER_PROMPT = 200
MAX_OPERAND = 99
MIN_STRING_LEN = 3
MAX_STRING_LEN = 6
STRING_ALPHABET = string.ascii_lowercase


def split_of(prompt_text: str) -> str:
    """The split an instance belongs to: a stable hash of its prompt text."""
    bucket = zlib.crc32(prompt_text.encode()) % EVAL_SHARE_DENOMINATOR
    return "eval" if bucket == 0 else "train"


def first_answer_line(completion_text: str) -> str:
    """The answer part of a completion: text up to the first newline or
    special-token markup (``</s>``, ``<|endoftext|>``: an engine may decode
    without skipping special tokens), stripped."""
    line = completion_text.strip().split("\n", 1)[0]
    return line.split("<", 1)[0].strip()


class TaskFamily:
    """A family of prompts with a reference answer and a verifier.

    Subclasses define ``name``, ``description``, ``answer_pattern`` (what a
    well-formed answer looks like), ``draw_instance`` (rng -> operands),
    ``format_prompt`` and ``solve``."""

    name: str = ""
    description: str = ""
    answer_pattern: re.Pattern[str] = re.compile(r".+")

    def draw_instance(self, rng: random.Random) -> tuple:
        raise NotImplementedError

    def format_prompt(self, instance: tuple) -> str:
        raise NotImplementedError

    def solve(self, instance: tuple) -> str:
        raise NotImplementedError

    def generate(self, seed: int, n: int, split: str = "train") -> list[Prompt]:
        """``n`` distinct prompts of ``split``; the same arguments give the same list."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        prompts: list[Prompt] = []
        seen: set[str] = set()
        for _ in range(n * MAX_DRAWS_PER_PROMPT):
            if len(prompts) == n:
                break
            instance = self.draw_instance(rng)
            text = self.format_prompt(instance)
            if text in seen or split_of(text) != split:
                continue
            seen.add(text)
            prompt_id = f"{self.name}-{split}-{seed}-{len(prompts)}"
            prompts.append(Prompt(prompt_id=prompt_id, text=text, answer=self.solve(instance)))
        if len(prompts) < n:
            raise ValueError(f"{self.name}: only {len(prompts)} distinct {split} prompts, asked {n}")
        return prompts

    def extract(self, completion_text: str) -> str | None:
        """The answer in a completion, or None when it is missing or malformed."""
        candidate = first_answer_line(completion_text)
        if not self.answer_pattern.fullmatch(candidate):
            return None
        return candidate

    def verify(self, completion_text: str, answer: str) -> bool:
        """True when the completion's extracted answer equals ``answer``."""
        extracted = self.extract(completion_text)
        return extracted is not None and extracted == answer


def _draw_operand(rng: random.Random) -> int:
    return rng.randint(0, MAX_OPERAND)


class AdditionFamily(TaskFamily):
    name = "add"
    description = f"Add two integers from 0 to {MAX_OPERAND}: '57+68=' -> '125'."
    answer_pattern = re.compile(r"\d+")

    def draw_instance(self, rng: random.Random) -> tuple[int, int]:
        return _draw_operand(rng), _draw_operand(rng)

    def format_prompt(self, instance: tuple[int, int]) -> str:
        return f"{instance[0]}+{instance[1]}="

    def solve(self, instance: tuple[int, int]) -> str:
        return str(instance[0] + instance[1])


class SubtractionFamily(TaskFamily):
    name = "sub"
    description = f"Subtract the smaller of two integers from 0 to {MAX_OPERAND} from the larger: '52-38=' -> '14'."
    answer_pattern = re.compile(r"\d+")

    def draw_instance(self, rng: random.Random) -> tuple[int, int]:
        a, b = _draw_operand(rng), _draw_operand(rng)
        return (a, b) if a >= b else (b, a)

    def format_prompt(self, instance: tuple[int, int]) -> str:
        return f"{instance[0]}-{instance[1]}="

    def solve(self, instance: tuple[int, int]) -> str:
        return str(instance[0] - instance[1])


def _draw_letters(rng: random.Random) -> str:
    length = rng.randint(MIN_STRING_LEN, MAX_STRING_LEN)
    return "".join(rng.choice(STRING_ALPHABET) for _ in range(length))


class ReverseFamily(TaskFamily):
    name = "reverse"
    description = f"Reverse {MIN_STRING_LEN}-{MAX_STRING_LEN} lowercase letters: 'rev:abcd=' -> 'dcba'."
    answer_pattern = re.compile(r"[a-z]+")

    def draw_instance(self, rng: random.Random) -> tuple[str]:
        return (_draw_letters(rng),)

    def format_prompt(self, instance: tuple[str]) -> str:
        return f"rev:{instance[0]}="

    def solve(self, instance: tuple[str]) -> str:
        return instance[0][::-1]


class SortFamily(TaskFamily):
    name = "sort"
    description = f"Sort {MIN_STRING_LEN}-{MAX_STRING_LEN} lowercase letters ascending: 'sort:dbca=' -> 'abcd'."
    answer_pattern = re.compile(r"[a-z]+")
    descending = False

    def draw_instance(self, rng: random.Random) -> tuple[str]:
        return (_draw_letters(rng),)

    def format_prompt(self, instance: tuple[str]) -> str:
        return f"sort:{instance[0]}="

    def solve(self, instance: tuple[str]) -> str:
        return "".join(sorted(instance[0], reverse=self.descending))


class SortDescendingFamily(SortFamily):
    """Same prompts (and the same splits) as ``sort``, opposite order: the
    family for a tenant rewarded for the opposite of a ``sort`` tenant."""

    name = "sort_desc"
    description = "Sort lowercase letters descending, on the same prompts as 'sort': 'sort:dbca=' -> 'dcba'."
    descending = True

    def generate(self, seed: int, n: int, split: str = "train") -> list[Prompt]:
        # Draw with sort's stream so both families see identical prompt lists.
        ascending = FAMILIES["sort"].generate(seed, n, split)
        return [
            Prompt(
                prompt_id=p.prompt_id.replace("sort-", "sort_desc-", 1),
                text=p.text,
                answer="".join(sorted(p.answer or "", reverse=True)),
            )
            for p in ascending
        ]


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in (
        AdditionFamily(),
        SubtractionFamily(),
        ReverseFamily(),
        SortFamily(),
        SortDescendingFamily(),
    )
}
# The families in the tiny model's pretraining mix (and the demo's four).
PRETRAIN_FAMILIES: tuple[str, ...] = ("add", "sub", "reverse", "sort")


def get_family(name: str) -> TaskFamily:
    """The family called ``name``; KeyError naming the known families otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}") from None

