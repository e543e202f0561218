"""The example datasets shipped in ``deploy/examples/data/``, made here from a
seed (nothing downloaded):

- ``gsm8k_sample.jsonl``: grade-school word problems in GSM8K's format,
  ``{"question": ..., "answer": "<worked steps>\\n#### 42"}``, each step with
  GSM8K's calculator annotation ``<<48/2=24>>``; for the reference spec.
- ``arithmetic_gsm8k.jsonl``: the tiny model's ``add`` and ``sub`` prompts
  (``57+68=``) with their answers in the same format; for its CPU twin,
  since the tiny model cannot read word problems.

    python -m shared.sample_datasets --out deploy/examples/data

writes both; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from shared.tasks import get_family

WORD_PROBLEMS_FILE = "gsm8k_sample.jsonl"
ARITHMETIC_FILE = "arithmetic_gsm8k.jsonl"
WORD_PROBLEMS = 200
ARITHMETIC_PER_FAMILY = 256
ARITHMETIC_FAMILIES = ("add", "sub")
SEED = 0

NAMES = [("Natalia", "she"), ("Weng", "he"), ("Betty", "she"), ("James", "he"), ("Maria", "she"),
         ("Tom", "he"), ("Aisha", "she"), ("Kenji", "he"), ("Lucia", "she"), ("Omar", "he")]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells"]

Problem = tuple[str, list[str], int]  # question, worked steps, final answer


def _step(expression: str, value: int, sentence: str) -> str:
    """One worked step in GSM8K's style: ``sentence`` holds ``{calc}``."""
    return sentence.format(calc=f"{expression} = <<{expression.replace(' ', '')}={value}>>{value}")


def _packs(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    packs, per_pack = rng.randint(2, 9), rng.randint(3, 12)
    total = packs * per_pack
    given = rng.randint(1, total - 1)
    question = (f"{name} buys {packs} packs of {item} with {per_pack} {item} in each pack. "
                f"{pronoun.capitalize()} gives away {given} {item}. How many {item} does {pronoun} have left?")
    steps = [_step(f"{packs} * {per_pack}", total, f"{name} buys {{calc}} {item}."),
             _step(f"{total} - {given}", total - given, f"{pronoun.capitalize()} has {{calc}} {item} left.")]
    return question, steps, total - given


def _wages(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    rate, hours, days = rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
    daily = rate * hours
    question = (f"{name} earns ${rate} an hour and works {hours} hours a day for {days} days. "
                f"How much money does {pronoun} earn?")
    steps = [_step(f"{rate} * {hours}", daily, f"Each day {pronoun} earns ${{calc}}."),
             _step(f"{daily} * {days}", daily * days, f"In {days} days {pronoun} earns ${{calc}}.")]
    return question, steps, daily * days


def _sharing(rng: random.Random) -> Problem:
    name, _ = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    kept = rng.randint(1, 10)
    total = friends * each + kept
    question = (f"{name} has {total} {item}. {name} keeps {kept} and shares the rest equally among "
                f"{friends} friends. How many {item} does each friend get?")
    steps = [_step(f"{total} - {kept}", total - kept, f"{name} shares {{calc}} {item}."),
             _step(f"{total - kept} / {friends}", each, f"Each friend gets {{calc}} {item}.")]
    return question, steps, each


def _farm(rng: random.Random) -> Problem:
    cows, times = rng.randint(3, 40), rng.randint(2, 6)
    chickens = cows * times
    question = (f"A farmer has {cows} cows and {times} times as many chickens. "
                "How many animals does the farmer have in total?")
    steps = [_step(f"{cows} * {times}", chickens, "The farmer has {calc} chickens."),
             _step(f"{cows} + {chickens}", cows + chickens, "In total there are {calc} animals.")]
    return question, steps, cows + chickens


def _change(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    price, count = rng.randint(2, 30), rng.randint(2, 6)
    cost = price * count
    bill = rng.choice([b for b in (20, 50, 100, 200) if b > cost] or [500])
    question = (f"A notebook costs ${price}. {name} buys {count} notebooks and pays with a ${bill} bill. "
                f"How much change does {pronoun} get?")
    steps = [_step(f"{price} * {count}", cost, "The notebooks cost ${calc}."),
             _step(f"{bill} - {cost}", bill - cost, f"{pronoun.capitalize()} gets ${{calc}} in change.")]
    return question, steps, bill - cost


def _reading(rng: random.Random) -> Problem:
    name, pronoun = rng.choice(NAMES)
    per_day, days = rng.randint(5, 40), rng.randint(2, 9)
    read = per_day * days
    pages = read + rng.randint(10, 300)
    question = (f"{name} reads {per_day} pages every day. The book has {pages} pages. "
                f"How many pages are left after {days} days?")
    steps = [_step(f"{per_day} * {days}", read, f"In {days} days {pronoun} reads {{calc}} pages."),
             _step(f"{pages} - {read}", pages - read, "There are {calc} pages left.")]
    return question, steps, pages - read


TEMPLATES: list[Callable[[random.Random], Problem]] = [_packs, _wages, _sharing, _farm, _change, _reading]


def word_problems(seed: int = SEED, count: int = WORD_PROBLEMS) -> list[dict[str, str]]:
    """``count`` distinct GSM8K-format rows, the same for the same seed."""
    rng = random.Random(f"gsm8k-sample:{seed}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        question, steps, answer = rng.choice(TEMPLATES)(rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"})
    return rows


def arithmetic_rows(seed: int = SEED, per_family: int = ARITHMETIC_PER_FAMILY) -> list[dict[str, str]]:
    """The tiny model's ``add`` and ``sub`` training prompts as GSM8K-format rows."""
    rows = []
    for name in ARITHMETIC_FAMILIES:
        for prompt in get_family(name).generate(seed, per_family, "train"):
            expression = prompt.text.rstrip("=")
            rows.append({"question": prompt.text,
                         "answer": f"{expression} = <<{expression}={prompt.answer}>>{prompt.answer}\n"
                                   f"#### {prompt.answer}"})
    random.Random(f"arithmetic:{seed}").shuffle(rows)
    return rows


def jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in ((WORD_PROBLEMS_FILE, word_problems()), (ARITHMETIC_FILE, arithmetic_rows())):
        (out / name).write_text(jsonl(rows), encoding="utf-8")
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("deploy/examples/data"))
    for path in write_all(parser.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
