"""The spec-bench task: Spec-Bench's records by category, two-turn prompts, references and their metrics, bad files.

Most tests read a small copy written here (a few categories, a two-turn prompt, missing references); one reads
the shared file when it is there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from speccascade.data import get_task, metrics
from speccascade.data.tasks.base import conversation
from speccascade.data.tasks.spec_bench import CATEGORIES, select
from speccascade.errors import SpeccascadeError

SHARED = Path(__file__).parents[2].parent / "shared/data/spec_bench/question.jsonl"

RECORDS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 2?", "And 3 + 3?"], "reference": ["4", "6"]},
    {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Guten Morgen"],
     "reference": ["Good morning"]},
    {"question_id": 162, "category": "translation", "turns": ["Translate German to English: Danke"]},  # no reference
    {"question_id": 321, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 401, "category": "math_reasoning", "turns": ["Ann has 3 pens and buys 4. How many?"],
     "reference": ["3 + 4 = <<3+4=7>>7\n#### 7"]},
    {"question_id": 481, "category": "rag", "turns": ["Passage ... What do forests provide?"],
     "reference": [["a source of lumber", "recreational areas"]]},
    {"question_id": 241, "category": "summarization", "turns": ["Summarize: The cat sat on the mat all day."],
     "reference": ["A cat sat on a mat."]},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def small(tmp_path) -> Path:
    return write_jsonl(tmp_path / "question.jsonl", RECORDS)


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(SpeccascadeError) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_categories_take_turns_and_carry_turns_and_references(small):
    examples = get_task("spec-bench").examples("test", data_file=small)
    assert [e.id for e in examples] == ["writing-81", "translation-161", "summarization-241", "qa-321",
                                        "math_reasoning-401", "rag-481", "math-111", "translation-162"]
    by_id = {e.id: e for e in examples}
    assert by_id["writing-81"].category == by_id["math-111"].category == "mt_bench"
    assert by_id["writing-81"].prompt == "Write a haiku about rain." and by_id["writing-81"].followups == ("Now make it rhyme.",)
    assert by_id["qa-321"].followups == () and by_id["qa-321"].answer == ""
    assert by_id["translation-161"].answer == "Good morning" and by_id["translation-162"].answer == ""
    assert by_id["math_reasoning-401"].answer == "7" and "<<" not in by_id["math_reasoning-401"].reference
    assert by_id["rag-481"].answer.split("\n") == ["a source of lumber", "recreational areas"]
    assert [e.id for e in get_task("spec-bench").examples("test", limit=3, data_file=small)] == [e.id for e in examples[:3]]


def test_each_category_is_scored_by_its_metric_and_unreferenced_ones_not_at_all(small):
    task = get_task("spec-bench")
    by_id = {e.id: e for e in task.examples("test", data_file=small)}
    assert task.score("Good morning", by_id["translation-161"]) == 1.0
    assert task.score("Good evening, everyone", by_id["translation-161"]) < 1.0
    assert task.score("A cat sat on a mat.", by_id["summarization-241"]) == 1.0
    assert task.score("So 3 + 4 = 7. The answer is 7.", by_id["math_reasoning-401"]) == 1.0
    assert task.score("The answer is 8.", by_id["math_reasoning-401"]) == 0.0
    assert task.score("Forests are a source of lumber.", by_id["rag-481"]) == 1.0
    assert task.score("Forests are lumber.", by_id["rag-481"]) == 0.0
    for unscored in ("writing-81", "math-111", "qa-321", "translation-162"):  # mt_bench, qa, a missing reference
        assert math.isnan(task.score("Good morning 4", by_id[unscored]))
    assert [task.metric_of(c) for c in CATEGORIES] == ["none", "bleu", "rouge2", "none", "exact_match", "contains_answer"]


def test_contains_answer_matches_whole_normalised_words():
    assert metrics.contains_answer("It was THE Lumber, mostly.", ["lumber"]) == 1.0
    assert metrics.contains_answer("There were 10 of them.", ["1"]) == 0.0
    assert metrics.contains_answer("anything", ["", "x"]) == 0.0


def test_a_later_turn_holds_the_earlier_replies(small):
    example = get_task("spec-bench").examples("test", data_file=small)[0]
    assert conversation(example, []) == [{"role": "user", "content": "Write a haiku about rain."}]
    assert conversation(example, ["Rain falls."]) == [
        {"role": "user", "content": "Write a haiku about rain."}, {"role": "assistant", "content": "Rain falls."},
        {"role": "user", "content": "Now make it rhyme."}]


def test_select_by_category_and_count(small):
    examples = get_task("spec-bench").examples("test", data_file=small)
    assert [e.id for e in select(examples, ["translation", "mt_bench"], 1)] == ["writing-81", "translation-161"]
    assert [e.category for e in select(examples, None, 1)] == ["mt_bench", "translation", "summarization", "qa",
                                                              "math_reasoning", "rag"]
    assert "unknown category 'chat'" in error_of(select, examples, ["chat"], None)
    assert error_of(select, examples, ["qa", "rag", "qa"], None) == "--categories names 'qa' more than once"
    few = [e for e in examples if e.category != "rag"]
    assert error_of(select, few, ["rag"], None) == "the data has no examples in category 'rag' (--categories)"


@pytest.mark.parametrize("record, message", [
    ({"question_id": 1, "category": "chat", "turns": ["hi"]}, "unknown category 'chat'"),
    ({"question_id": 1, "category": "qa", "turns": []}, "field 'turns' is not a non-empty list of strings"),
    ({"category": "qa", "turns": ["hi"]}, "record has no 'question_id'"),
    ({"question_id": 1, "category": "rag", "turns": ["q"], "reference": ["one answer"]}, "list of answer strings"),
    ({"question_id": 1, "category": "math_reasoning", "turns": ["q"], "reference": ["no marker"]},
     "field 'reference' of a math_reasoning record does not end with '#### N'"),
    ({"question_id": 1, "category": "translation", "turns": ["q"], "reference": "text"}, "'reference' is not a list"),
])
def test_a_bad_record_names_its_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], record])
    text = error_of(get_task("spec-bench").examples, "test", data_file=path)
    assert text.startswith(f"{path}:2: ") and message in text


def test_bad_settings_and_files(tmp_path, small):
    task = get_task("spec-bench")
    assert "pass --data-file" in error_of(task.examples, "test")
    assert "one split, 'test'" in error_of(task.examples, "train", data_file=small)
    assert "no few-shot" in error_of(task.examples, "test", data_file=small, few_shot=1)
    assert "not found" in error_of(task.examples, "test", data_file=tmp_path / "missing.jsonl")
    (tmp_path / "garbled.jsonl").write_text('{"question_id": 1,\n')
    assert "invalid JSON" in error_of(task.examples, "test", data_file=tmp_path / "garbled.jsonl")
    twice = write_jsonl(tmp_path / "twice.jsonl", [RECORDS[0], RECORDS[0]])
    assert "more than one example with id 'writing-81'" in error_of(task.examples, "test", data_file=twice)


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared Spec-Bench copy is not here")
def test_the_shared_file_has_six_categories_of_80():
    examples = get_task("spec-bench").examples("test", data_file=SHARED)
    assert len(examples) == 480 and [e.category for e in examples[:6]] == list(CATEGORIES)
    for category in CATEGORIES:
        chosen = [e for e in examples if e.category == category]
        assert len(chosen) == 80
        assert all(len(e.followups) == (1 if category == "mt_bench" else 0) for e in chosen)
    referenced = {c: sum(bool(e.answer) for e in examples if e.category == c) for c in CATEGORIES}
    assert referenced == {"mt_bench": 0, "translation": 80, "summarization": 80, "qa": 0, "math_reasoning": 80, "rag": 80}


@pytest.mark.skipif(not SHARED.is_file(), reason="the shared Spec-Bench copy is not here")
def test_the_tiny_random_pair_holds_every_prompt_with_1024_new_tokens():
    """tiny-random's byte-level tokens make Spec-Bench's summaries its longest prompts (6,850 bytes): its context
    takes each of them with the GPU configuration's 1,024 new tokens, so the whole file runs on it."""
    from speccascade.decoding import load_pair

    pair = load_pair("tiny-random")
    examples = get_task("spec-bench").examples("test", data_file=SHARED)
    _, mask = pair.encode([e.prompt for e in examples])
    longest = int(mask.sum(1).max())
    assert longest > 6000 and longest + 1024 <= pair.context_length
