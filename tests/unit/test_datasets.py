"""Dataset task sources: hostile paths refused (in the spec and on disk),
bounded reading with the bad line named, GSM8K answers, the seeded held-out
split and the epochs / sample orders, what the scheduler hands out for a
dataset or chat task, and the shipped sample files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.scheduler.prompts import ExperimentFailure, PromptSource, chat_prompt
from services.scheduler.spec import validate_spec
from services.scheduler.state import ExperimentView
from shared import datasets
from shared.datasets import DatasetError, path_problem, read_rows, resolve_under, split_dataset, step_prompts
from shared.messages import ChatFormat, ChatMessage, DatasetSource, ExperimentSpec, Prompt, RewardSpec, TaskSource
from shared.sample_datasets import ARITHMETIC_FILE, WORD_PROBLEMS_FILE, arithmetic_rows, jsonl, word_problems

EXAMPLE_DATA = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dataset_spec(experiment_id: str = "ds", reward: RewardSpec | None = None, **source) -> ExperimentSpec:
    source = {"path": "math.jsonl", **source}
    return ExperimentSpec(experiment_id=experiment_id, task=TaskSource(dataset=DatasetSource(**source)),
                          reward=reward or RewardSpec(type="exact_match"), prompts_per_step=4, eval_size=8)


# ---------------------------------------------------------------- hostile paths


@pytest.mark.parametrize("path", ["/etc/passwd", "../secrets.jsonl", "data/../../x.jsonl", "~/x.jsonl",
                                  "C:/x.jsonl", "a\\..\\b", "a\x00b", ""])
def test_hostile_paths_are_refused_in_the_spec(path):
    reasons = validate_spec(dataset_spec(path=path))
    assert len(reasons) == 1 and reasons[0].startswith("task.dataset.path: "), reasons
    assert path_problem(path) is not None


def test_a_symlink_out_of_the_datasets_directory_is_refused(tmp_path):
    root, outside = tmp_path / "datasets", tmp_path / "private"
    root.mkdir()
    outside.mkdir()
    write_jsonl(outside / "secret.jsonl", [{"question": "1+1=", "answer": "2"}])
    os.symlink(outside / "secret.jsonl", root / "link.jsonl")
    os.symlink(outside, root / "dir")
    for path in ("link.jsonl", "dir/secret.jsonl"):
        with pytest.raises(DatasetError, match="leads out of the datasets directory"):
            read_rows(root, DatasetSource(path=path))
    write_jsonl(root / "inside.jsonl", [{"question": "1+1=", "answer": "2"}])
    os.symlink(root / "inside.jsonl", root / "alias.jsonl")
    assert resolve_under(root, "alias.jsonl") == (root / "inside.jsonl").resolve()


def test_spec_checks_of_a_dataset_source():
    assert validate_spec(dataset_spec()) == []
    assert validate_spec(dataset_spec(held_out=0.2)) == []
    reasons = validate_spec(dataset_spec(held_out=1.5, seed=-1, prompt_field="", answer_field=None))
    assert any(r.startswith("task.dataset.held_out: a share must be in [0, 1)") for r in reasons), reasons
    assert any(r.startswith("task.dataset.seed: must be >= 0") for r in reasons), reasons
    assert any(r.startswith("task.dataset.prompt_field: must be 1 to") for r in reasons), reasons
    assert any(r.startswith("task.dataset.answer_field: reward type 'exact_match' needs") for r in reasons), reasons
    both = ExperimentSpec(experiment_id="x", reward=RewardSpec(type="exact_match"),
                          task=TaskSource(family="add", dataset=DatasetSource(path="a.jsonl")))
    assert validate_spec(both)[0] == ("task: give exactly one of family, prompts, stream, dataset "
                                      "(got family and dataset)")


# ---------------------------------------------------------------- reading


def test_bad_lines_are_named(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n\n{"question": \n')
    with pytest.raises(DatasetError, match="^line 3: not JSON"):
        read_rows(tmp_path, DatasetSource(path="broken.jsonl"))
    (tmp_path / "list.jsonl").write_text('[1, 2]\n')
    with pytest.raises(DatasetError, match="^line 1: expected a JSON object, got list"):
        read_rows(tmp_path, DatasetSource(path="list.jsonl"))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(DatasetError, match="^line 1: not JSON"):
        read_rows(tmp_path, DatasetSource(path="deep.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_rows(tmp_path, DatasetSource(path="latin1.jsonl"))
    with pytest.raises(DatasetError, match="no such file"):
        read_rows(tmp_path, DatasetSource(path="missing.jsonl"))


def test_reading_is_bounded(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "rows.jsonl", [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(10)])
    monkeypatch.setattr(datasets, "MAX_DATASET_ROWS", 9)
    with pytest.raises(DatasetError, match="more than 9 rows"):
        read_rows(tmp_path, DatasetSource(path="rows.jsonl"))
    monkeypatch.setattr(datasets, "MAX_DATASET_BYTES", 100)
    with pytest.raises(DatasetError, match="over 100 bytes"):
        read_rows(tmp_path, DatasetSource(path="rows.jsonl"))


def test_rows_become_prompts_with_gsm8k_answers_and_chat_turns():
    source = DatasetSource(path="x", answer_format="gsm8k")
    row = datasets.DatasetRow(7, {"question": "How many?", "answer": "3 * 400 = 1,200\n#### 1,200"})
    assert datasets.row_prompt(row, source) == Prompt(prompt_id="row-7", text="How many?", answer="1200")
    with pytest.raises(DatasetError, match="^row 7: answer has no '####'"):
        datasets.row_prompt(datasets.DatasetRow(7, {"question": "q", "answer": "12"}), source)
    with pytest.raises(DatasetError, match="^row 8: no field 'question'"):
        datasets.row_prompt(datasets.DatasetRow(8, {"prompt": "q", "answer": "#### 1"}), source)
    chat = DatasetSource(path="x", messages_field="messages", answer_field="label")
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2="}]
    prompt = datasets.row_prompt(datasets.DatasetRow(1, {"messages": turns, "label": 4}), chat)
    assert prompt.messages == [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="2+2=")]
    assert prompt.answer == "4"
    with pytest.raises(DatasetError, match="a message must be"):
        datasets.row_prompt(datasets.DatasetRow(2, {"messages": [{"role": "root", "content": "x"}], "label": 1}),
                            chat)


# ---------------------------------------------------------------- split and order


def numbered(count: int) -> list[Prompt]:
    return [Prompt(prompt_id=f"row-{i}", text=f"{i}=") for i in range(count)]


def test_the_held_out_split_is_seeded_and_disjoint():
    prompts = numbered(100)
    split = split_dataset(prompts, 0.2, seed=3)
    assert len(split.held_out) == 20 and len(split.train) == 80
    assert {p.prompt_id for p in split.train}.isdisjoint(p.prompt_id for p in split.held_out)
    assert split == split_dataset(prompts, 0.2, seed=3)
    assert split.held_out != split_dataset(prompts, 0.2, seed=4).held_out
    assert len(split_dataset(prompts, 7, seed=3).held_out) == 7
    with pytest.raises(DatasetError, match="leaves none to train on"):
        split_dataset(prompts, 100, seed=0)


def test_epochs_visit_every_row_once_per_pass_in_a_fresh_order():
    train = numbered(12)
    steps = [step_prompts(train, "epochs", 0, step, 4) for step in range(6)]
    first, second = sum(steps[:3], []), sum(steps[3:], [])
    assert sorted(p.prompt_id for p in first) == sorted(p.prompt_id for p in train)
    assert sorted(p.prompt_id for p in second) == sorted(p.prompt_id for p in train)
    assert first != second
    assert steps == [step_prompts(train, "epochs", 0, step, 4) for step in range(6)]


def test_sample_draws_with_replacement_the_same_on_every_call():
    train = numbered(5)
    drawn = [step_prompts(train, "sample", 1, step, 8) for step in range(4)]
    assert drawn == [step_prompts(train, "sample", 1, step, 8) for step in range(4)]
    assert any(len({p.prompt_id for p in step}) < 8 for step in drawn)  # 8 of 5 rows: repeats


# ---------------------------------------------------------------- what the scheduler hands out


def test_prompt_source_reads_the_dataset_and_holds_its_split_out(tmp_path):
    write_jsonl(tmp_path / "math.jsonl",
                [{"question": f"{i}+1=", "answer": f"{i}+1 = {i + 1}\n#### {i + 1}"} for i in range(40)])
    view = ExperimentView(spec=dataset_spec(held_out=10, answer_format="gsm8k"), status="running")
    source = PromptSource(tmp_path)
    held_out = source.held_out(view)
    assert source.held_out_size(view) == 8 == len(held_out)  # eval_size 8 of the 10 held out
    trained = {p.prompt_id for step in range(20) for p in source.train(view, step)}
    assert len(trained) == 30 and trained.isdisjoint(p.prompt_id for p in held_out)
    assert all(p.answer == str(int(p.text.split("+")[0]) + 1) for p in held_out)


def test_a_dataset_that_cannot_feed_the_experiment_fails_it_with_the_reason(tmp_path):
    write_jsonl(tmp_path / "math.jsonl", [{"question": "1+1=", "answer": "2"}, {"question": "", "answer": "0"}])
    with pytest.raises(ExperimentFailure, match=r"^task.dataset 'math.jsonl': row 2: the prompt has an empty text"):
        PromptSource(tmp_path).train(ExperimentView(spec=dataset_spec(), status="running"), 0)
    with pytest.raises(ExperimentFailure, match="no datasets directory"):
        PromptSource(None).train(ExperimentView(spec=dataset_spec(), status="running"), 0)


def test_chat_prompts_get_the_system_turn_and_thinking_switch():
    text = Prompt(prompt_id="a", text="2+2=", answer="4")
    assert chat_prompt(None, text) is text
    rendered = chat_prompt(ChatFormat(system="be brief", enable_thinking=False), text)
    assert rendered.messages == [ChatMessage(role="system", content="be brief"),
                                 ChatMessage(role="user", content="2+2=")]
    assert (rendered.text, rendered.answer, rendered.enable_thinking) == ("2+2=", "4", False)
    own_system = Prompt(prompt_id="b", messages=[ChatMessage(role="system", content="mine"),
                                                 ChatMessage(role="user", content="3+3=")])
    kept = chat_prompt(ChatFormat(system="be brief"), own_system)
    assert kept.messages == own_system.messages and kept.text == "3+3="


def test_hugging_face_saved_datasets_are_read_where_installed(tmp_path):
    try:
        import datasets as hf_datasets  # type: ignore[import-not-found]
    except ImportError:
        (tmp_path / "saved").mkdir()
        with pytest.raises(DatasetError, match="the `datasets` package is not installed"):
            read_rows(tmp_path, DatasetSource(path="saved"))
        return
    hf_datasets.Dataset.from_list([{"question": "1+1=", "answer": "2"}]).save_to_disk(str(tmp_path / "saved"))
    rows = read_rows(tmp_path, DatasetSource(path="saved"))
    assert [row.values for row in rows] == [{"question": "1+1=", "answer": "2"}]


# ---------------------------------------------------------------- the shipped files


def test_the_shipped_sample_files_are_what_the_generator_makes():
    assert (EXAMPLE_DATA / WORD_PROBLEMS_FILE).read_text() == jsonl(word_problems())
    assert (EXAMPLE_DATA / ARITHMETIC_FILE).read_text() == jsonl(arithmetic_rows())
    rows = read_rows(EXAMPLE_DATA, DatasetSource(path=WORD_PROBLEMS_FILE))
    prompts = [datasets.row_prompt(row, DatasetSource(path="x", answer_format="gsm8k")) for row in rows]
    assert len(prompts) == 200 and len({p.text for p in prompts}) == 200
    assert all(p.answer is not None and p.answer.isdigit() for p in prompts)
