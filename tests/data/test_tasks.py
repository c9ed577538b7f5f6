"""Task registry: prompts, references and metrics of every task, the arithmetic generator, data-file errors.

No network: hub loading is either refused before it starts or replaced by a fake ``load_dataset``.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from speccascade.data import TASKS, Example, Task, get_task, metrics
from speccascade.data.tasks import arithmetic
from speccascade.errors import SpeccascadeError

SHARED_GSM8K = Path(__file__).parents[2].parent / "shared/data/gsm8k"
EQUATION = re.compile(r"(-?\d+) ([-+*/]) (\d+) = (-?\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}

GSM8K_RECORDS = [
    {"question": "Ann has 3 pens and buys 4 more. How many pens?", "answer": "3 + 4 = <<3+4=7>>7 pens.\n#### 7"},
    {"question": "A box costs $1,200. Two boxes?", "answer": "2 * 1,200 = $<<2*1200=2400>>2,400.\n#### 2,400"},
    {"question": "Bo has 10 and loses 13. Net?", "answer": "10 - 13 = <<10-13=-3>>-3\n#### -3"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(call, *args, **kwargs) -> str:
    """The message of the SpeccascadeError that ``call`` raises; it must be one line."""
    with pytest.raises(SpeccascadeError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def steps_of(reference: str) -> list[tuple[int, str, int, int]]:
    """The ``a op b = c.`` steps of a worked arithmetic reference, each checked to be correct."""
    steps = [(int(a), op, int(b), int(c)) for a, op, b, c in EQUATION.findall(reference)]
    for a, op, b, c in steps:
        assert OPS[op](a, b) == c, reference
    return steps


# ---------------------------------------------------------------- registry


def test_registry_names_and_metrics():
    assert {name: cls.metric for name, cls in TASKS.items()} == {
        "arithmetic": "exact_match", "gsm8k": "exact_match", "summarisation": "rouge2", "cnn-dm": "rouge2",
        "translation": "bleu", "qa": "f1", "worked-arithmetic": "exact_match", "spec-bench": "per-category",
    }
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name


def test_unknown_task():
    assert error_of(get_task, "nope") == ("unknown task 'nope'; known: arithmetic, gsm8k, summarisation, cnn-dm, translation, qa, "
                                          "worked-arithmetic, spec-bench")


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_by_seed():
    task = get_task("arithmetic")
    assert task.examples("train", limit=20, seed=3) == task.examples("train", limit=20, seed=3)
    assert task.examples("train", limit=20, seed=3) != task.examples("train", limit=20, seed=4)


def test_arithmetic_splits_are_disjoint():
    task = get_task("arithmetic")
    questions = {s: {e.prompt for e in task.examples(s, limit=400)} for s in arithmetic.SPLITS}
    assert all(len(q) > 300 for q in questions.values())  # a real spread of questions, not a few repeated
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    for split, prompts in questions.items():  # each question sits in the split its hash picks
        assert {arithmetic.split_of(p.rsplit("Question: ", 1)[1]) for p in prompts} == {split}
    ids = [e.id for s in arithmetic.SPLITS for e in task.examples(s, limit=5)]
    assert len(set(ids)) == len(ids) and ids[5] == "arithmetic-validation-00000"


def test_arithmetic_levels_take_turns_and_answers_are_right():
    task = get_task("arithmetic")
    for i, example in enumerate(task.examples("test", limit=200, seed=1)):
        steps = steps_of(example.reference)
        ops = {op for _, op, _, _ in steps}
        numbers = [n for a, _, b, c in steps for n in (a, b, c)]
        level = 1 + i % 4
        if level == 1:
            assert len(steps) == 1 and ops <= {"+", "-"} and max(numbers) <= 40
        elif level == 2:
            assert len(steps) == 2 and ops <= {"+", "-"}
        elif level == 3:
            assert len(steps) == 1 and ops <= {"*", "/"}
        else:
            assert len(steps) >= 3 and max(numbers) >= 100
        assert example.reference.endswith(f"The answer is {example.answer}.")
        assert steps[-1][3] == int(example.answer)
        a, op, b, _ = steps[0]
        assert str(a) in example.prompt or str(b) in example.prompt  # the work starts from the question's numbers
        assert task.score(example.reference, example) == 1.0
        assert task.score(f"The answer is {int(example.answer) + 1}.", example) == 0.0


def test_arithmetic_templates_all_produce_correct_problems():
    words = (*arithmetic.NAMES, *arithmetic.THINGS, *arithmetic.GAINS, *arithmetic.LOSSES)
    filler = re.compile(r"\d+|\b(?:" + "|".join(words) + r")\b")
    rng = random.Random(0)
    for level, templates in arithmetic.TEMPLATES.items():
        skeletons, fillers = set(), set()
        for _ in range(300):
            problem = arithmetic.make_problem(rng, level)
            steps = steps_of(" ".join(problem.steps))
            assert len(steps) == len(problem.steps) and steps[-1][3] == problem.answer > 0
            assert all(n <= 999 for n in map(int, re.findall(r"\d+", problem.question)))
            skeletons.add(filler.sub("_", problem.question))
            fillers.update(filler.findall(problem.question))
        assert len(skeletons) == len(templates) == 4, f"level {level} uses each of its templates"
        assert len(fillers & set(arithmetic.NAMES)) >= 10 and len(fillers & set(arithmetic.THINGS)) >= 8


def test_arithmetic_prompt_limit_and_few_shot():
    task = get_task("arithmetic")
    first = task.examples("validation", limit=3)[0]
    assert first.prompt.startswith(arithmetic.STEP_BY_STEP) and '"The answer is N."' in first.prompt
    assert first.prompt.endswith("?") and "Question: " in first.prompt
    assert len(task.examples("validation")) == arithmetic.DEFAULT_COUNT
    assert task.examples("validation", limit=10)[:4] == task.examples("validation", limit=4)
    shot = task.examples("train", limit=1)[0]
    shot_query = shot.prompt.split("\n\n")[-1]
    few = task.examples("test", limit=2, few_shot=2)
    assert f"{shot_query}\nAnswer: {shot.reference}\n\n" in few[0].prompt
    assert [e.id for e in few] == ["arithmetic-test-00000", "arithmetic-test-00001"]
    on_train = task.examples("train", limit=2, few_shot=2)  # the shots are not evaluated
    assert [e.id for e in on_train] == ["arithmetic-train-00002", "arithmetic-train-00003"]


def test_arithmetic_bad_input(tmp_path):
    task = get_task("arithmetic")
    assert "unknown split 'dev'" in error_of(task.examples, "dev")
    assert "takes no data file" in error_of(task.examples, "train", data_file=tmp_path / "x.jsonl")
    assert error_of(task.examples, "train", limit=0) == "arithmetic (split 'train') has no examples"
    assert "limit must be >= 0" in error_of(task.examples, "train", limit=-1)
    assert "few_shot must be >= 0" in error_of(task.examples, "train", few_shot=-2)


# ---------------------------------------------------------------- gsm8k


def test_gsm8k_from_jsonl(tmp_path):
    task = get_task("gsm8k")
    examples = task.examples("test", data_file=write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS))
    assert [e.id for e in examples] == ["gsm8k-test-00000", "gsm8k-test-00001", "gsm8k-test-00002"]
    first = examples[0]
    assert first.prompt.endswith("Question: Ann has 3 pens and buys 4 more. How many pens?")
    assert "The answer is N." in first.prompt
    assert first.reference == "3 + 4 = 7 pens.\nThe answer is 7." and first.answer == "7"
    assert examples[1].reference == "2 * 1,200 = $2,400.\nThe answer is 2,400."
    assert [e.answer for e in examples] == ["7", "2,400", "-3"]
    assert [task.score(e.reference, e) for e in examples] == [1.0, 1.0, 1.0]
    assert task.score("2400", examples[1]) == 1.0 and task.score("#### 3", examples[2]) == 0.0


def test_gsm8k_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GSM8K_RECORDS), tmp_path / "g.parquet")
    task = get_task("gsm8k")
    from_jsonl = task.examples("test", data_file=write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS))
    assert task.examples("test", data_file=tmp_path / "g.parquet") == from_jsonl


def test_gsm8k_few_shot_from_a_data_file(tmp_path):
    task = get_task("gsm8k")
    examples = task.examples("test", limit=1, data_file=write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS), few_shot=2)
    assert [e.id for e in examples] == ["gsm8k-test-00002"]  # the first two records are the shots
    prompt = examples[0].prompt
    assert "Question: Ann has 3 pens" in prompt and "Answer: 3 + 4 = 7 pens.\nThe answer is 7.\n\n" in prompt
    assert "Question: A box costs" in prompt and prompt.endswith("Question: Bo has 10 and loses 13. Net?")


@pytest.mark.skipif(not (SHARED_GSM8K / "test.jsonl").is_file(), reason="shared GSM8K copy absent")
def test_gsm8k_shared_test_file():
    task = get_task("gsm8k")
    examples = task.examples("test", data_file=SHARED_GSM8K / "test.jsonl")
    assert len(examples) == 1319 and examples[3].id == "gsm8k-test-00003"
    assert examples[0].answer == "18" and "$18 every day" in examples[0].reference
    for example in examples:
        assert "<<" not in example.reference and "####" not in example.reference
        assert example.reference.endswith(f"The answer is {example.answer}.")
        assert task.score(example.reference, example) == 1.0
    assert task.examples("test", limit=5, data_file=SHARED_GSM8K / "test.jsonl") == examples[:5]


@pytest.mark.parametrize(
    ("prediction", "answer", "score"),
    [
        ("So she has 1,234 apples.", "1234", 1.0),
        ("The answer is 1,234.", "1,234", 1.0),
        ("It costs $5", "5", 1.0),
        ("#### $5.00", "5", 1.0),
        ("She makes 18.00 dollars.", "18", 1.0),
        ("The answer is 2.5.", "2.5", 1.0),
        ("The answer is 2.5.", "25", 0.0),
        ("The answer is 2.5.", "2", 0.0),
        ("The change is -3.", "-3", 1.0),
        ("The change is 3.", "-3", 0.0),
        ("16-3-4=9", "9", 1.0),
        ("The answer is 7.", "7", 1.0),
        ("#### 7", "7", 1.0),
        ("The answer is 7. Check: 7 + 5 = 12", "7", 1.0),
        ("I got 12 at first.\n#### 7", "12", 0.0),
        ("the final answer is: 40%", "40", 1.0),
        ("I do not know.", "7", 0.0),
        ("", "0", 0.0),
    ],
)
def test_gsm8k_answer_extraction(prediction, answer, score):
    example = Example("x", "q", "r", answer)
    assert get_task("gsm8k").score(prediction, example) == score


def test_number_normalisation():
    assert metrics.normalize_number("$1,234.00") == "1234"
    assert metrics.normalize_number("-2.50") == "-2.5"
    assert metrics.normalize_number("1800") == "1800"
    assert metrics.normalize_number("-0") == "0"
    assert metrics.normalize_number("seven") is None
    assert metrics.final_number("no digits here") is None


def test_gsm8k_bad_records(tmp_path):
    task = get_task("gsm8k")
    path = write_jsonl(tmp_path / "g.jsonl", [GSM8K_RECORDS[0], {"question": "Where is the answer?"}])
    assert error_of(task.examples, "test", data_file=path) == f"{path}:2: record has no field 'answer'"
    path = write_jsonl(tmp_path / "h.jsonl", [{"question": "q", "answer": "no final line"}])
    assert error_of(task.examples, "test", data_file=path) == f"{path}:1: field 'answer' does not end with '#### N'"
    path = write_jsonl(tmp_path / "i.jsonl", [{"question": 3, "answer": "#### 3"}])
    assert error_of(task.examples, "test", data_file=path) == f"{path}:1: field 'question' is not a string"


# ---------------------------------------------------------------- hub loading (faked)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace ``datasets.load_dataset`` by an in-memory hub; yields the list of calls made."""
    import datasets

    calls: list[tuple] = []
    splits = {"train": GSM8K_RECORDS[:2], "test": GSM8K_RECORDS[2:]}

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_loading_with_train_shots(fake_hub):
    examples = get_task("gsm8k").examples("test", few_shot=1)
    assert fake_hub == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    assert [e.id for e in examples] == ["gsm8k-test-00000"] and examples[0].answer == "-3"
    assert "Question: Ann has 3 pens" in examples[0].prompt and "A box costs" not in examples[0].prompt


def test_data_file_never_touches_the_hub(fake_hub, tmp_path):
    get_task("gsm8k").examples("test", few_shot=1, data_file=write_jsonl(tmp_path / "g.jsonl", GSM8K_RECORDS))
    assert fake_hub == []


def test_hub_failure_is_one_clear_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline mode is enabled\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert error_of(get_task("gsm8k").examples, "test") == (
        "cannot load dataset 'openai/gsm8k' from the hub (offline mode is enabled); pass --data-file"
    )


def test_unknown_hub_split(fake_hub):
    assert error_of(get_task("gsm8k").examples, "validation") == "openai/gsm8k has splits train, test, not 'validation'"
    assert fake_hub == []


# ---------------------------------------------------------------- summarisation


def test_summarisation(tmp_path):
    records = [
        {"id": "3412", "document": "The council voted on Monday to close the old bridge.",
         "summary": "The old bridge will close."},
        {"document": "Heavy rain flooded the town centre.", "summary": "Rain flooded the town."},
    ]
    task = get_task("summarisation")
    examples = task.examples("test", data_file=write_jsonl(tmp_path / "x.jsonl", records))
    assert [e.id for e in examples] == ["3412", "summarisation-test-00001"]
    assert examples[0].prompt == (
        "Summarise the article in one sentence.\n\nArticle: The council voted on Monday to close the old bridge."
    )
    assert examples[0].reference == examples[0].answer == "The old bridge will close."
    assert task.score("The old bridge will close.", examples[0]) == pytest.approx(1.0)
    assert task.score("Voters met councillors yesterday.", examples[0]) == 0.0
    assert 0.0 < task.score("The old bridge is open.", examples[0]) < 1.0


def test_rouge2_by_hand():
    assert metrics.rouge2("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert metrics.rouge2("dogs bark loudly", "the cat sat on the mat") == 0.0
    # bigrams: prediction {the cat, cat sat}, reference {the cat, cat ran}: P = R = 1/2
    assert metrics.rouge2("the cat sat", "the cat ran") == pytest.approx(0.5)


# ---------------------------------------------------------------- translation


def test_translation_both_record_formats(tmp_path):
    records = [
        {"translation": {"en": "The house is small.", "de": "Das Haus ist klein."}},
        {"source": "Good morning.", "target": "Guten Morgen."},
    ]
    task = get_task("translation")
    examples = task.examples("test", data_file=write_jsonl(tmp_path / "w.jsonl", records))
    assert examples[0].prompt.endswith("\n\nEnglish: The house is small.") and "into German" in examples[0].prompt
    assert [e.answer for e in examples] == ["Das Haus ist klein.", "Guten Morgen."]
    assert [e.reference for e in examples] == [e.answer for e in examples]
    assert task.score("Das Haus ist klein.\n", examples[0]) == pytest.approx(1.0)
    assert task.score("Guten Morgen.", examples[1]) == pytest.approx(1.0)
    assert task.score("Ein Auto fährt schnell", examples[0]) == 0.0


def test_bleu_by_hand():
    assert metrics.bleu("Das Haus ist sehr klein .", "Das Haus ist sehr klein .") == 1.0
    assert metrics.bleu("x y z", "Das Haus ist klein") == 0.0
    assert 0.0 < metrics.bleu("Das Haus ist groß .", "Das Haus ist sehr klein .") < 1.0


def test_translation_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"source": "Hello."}])
    message = error_of(get_task("translation").examples, "test", data_file=path)
    assert message == f"{path}:1: record has no field 'target'"
    path = write_jsonl(tmp_path / "v.jsonl", [{"en": "Hello.", "de": "Hallo."}])
    assert "record has no field 'translation' (or 'source' and 'target')" in error_of(
        get_task("translation").examples, "test", data_file=path
    )
    path = write_jsonl(tmp_path / "u.jsonl", [{"translation": {"en": "Hello."}}])
    assert error_of(get_task("translation").examples, "test", data_file=path) == (
        f"{path}:1: record has no field 'translation.de'"
    )


# ---------------------------------------------------------------- qa


def test_qa(tmp_path):
    records = [{
        "id": "5733be284776f41900661182",
        "context": "The Eiffel Tower was finished in 1889 in Paris.",
        "question": "When was the Eiffel Tower finished?",
        "answers": {"text": ["1889", "in 1889"], "answer_start": [33, 30]},
    }]
    task = get_task("qa")
    (example,) = task.examples("validation", data_file=write_jsonl(tmp_path / "s.jsonl", records))
    assert example.id == "5733be284776f41900661182"
    assert example.prompt.endswith(
        "Passage: The Eiffel Tower was finished in 1889 in Paris.\nQuestion: When was the Eiffel Tower finished?"
    )
    assert example.reference == "1889" and example.answer == "1889\nin 1889"
    assert task.score("In 1889.", example) == 1.0
    assert task.score("It was finished in the year 1889", example) == pytest.approx(2 * (2 / 6) * 1 / (2 / 6 + 1))
    assert task.score("Paris", example) == 0.0


def test_squad_normalisation():
    assert metrics.normalize_answer("  The Eiffel-Tower, an icon! ") == "eiffeltower icon"
    assert metrics.exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert metrics.exact_match("Eiffel Tower", "the Eiffel tower") == 1.0  # one gold string is not split in letters
    assert metrics.exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    assert metrics.f1("the big red dog", ["red dog"]) == pytest.approx(0.8)  # P 2/3, R 1
    assert metrics.f1("red dog", ["cat", "a red dog"]) == 1.0
    assert metrics.f1("blue", ["red dog"]) == 0.0
    assert metrics.f1("the", ["a"]) == 1.0  # both empty after normalisation


def test_qa_bad_answers(tmp_path):
    record = {"context": "c", "question": "q", "answers": {"text": []}}
    path = write_jsonl(tmp_path / "s.jsonl", [record])
    assert error_of(get_task("qa").examples, "validation", data_file=path) == (
        f"{path}:1: field 'answers.text' is not a non-empty list of strings"
    )


# ---------------------------------------------------------------- data files


def test_missing_data_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert error_of(get_task("gsm8k").examples, "test", data_file=path) == f"data file '{path}' not found"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GSM8K_RECORDS[0]) + "\n\n" + '{"question": "q", "answer": \n')
    message = error_of(get_task("gsm8k").examples, "test", data_file=path)
    assert message.startswith(f"{path}:3: invalid JSON: ")


def test_other_bad_files(tmp_path):
    task = get_task("gsm8k")
    path = write_jsonl(tmp_path / "list.json", [["question", "answer"]])
    assert error_of(task.examples, "test", data_file=path) == f"{path}:1: record is not a JSON object"
    path = tmp_path / "g.csv"
    path.write_text("question,answer\n")
    assert "is not .jsonl, .json (JSON lines) or .parquet" in error_of(task.examples, "test", data_file=path)
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet")
    assert "is not a readable parquet file" in error_of(task.examples, "test", data_file=path)
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert error_of(task.examples, "test", data_file=path) == f"gsm8k ({path}, split 'test') has no examples"
    path = write_jsonl(tmp_path / "twice.jsonl", [dict(GSM8K_RECORDS[0], id="a"), dict(GSM8K_RECORDS[1], id="a")])
    assert "more than one example with id 'a'" in error_of(task.examples, "test", data_file=path)
