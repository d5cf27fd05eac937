"""Datasets (jsonl / parquet layouts, errors with file and row), prompt rendering, the arithmetic task."""

from __future__ import annotations

import itertools
import json
import operator
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_sapo.data import (
    ArithmeticTask,
    DataError,
    PromptRecord,
    arithmetic_records,
    load_records,
    render_prompt,
    sft_text,
)
from megatron_sapo.rewards import exact_match, get_reward
from megatron_sapo.utils.tiny import train_tokenizer

DAPO_ROWS = [
    {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": "Solve 1 + 1. Answer: $Answer"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "2", "style": "rule-lax"},
        "extra_info": {"index": "a"},
    },
    {
        "data_source": "math_dapo",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 1/2 + 1/4?"},
        ],
        "ability": "MATH",
        "reward_model": {"ground_truth": "\\frac{3}{4}", "style": "rule-lax"},
        "extra_info": {"index": "b"},
    },
]
GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A car costs $1,200 ...", "answer": "It costs 1,200.\n#### 1,200"},
]
DAPO = {"prompt_field": "prompt", "answer_field": "reward_model.ground_truth"}
GSM8K = {"prompt_field": "question", "answer_field": "answer", "answer_extract": "gsm8k"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(params=["jsonl", "parquet"])
def write(request, tmp_path):
    def _write(rows):
        if request.param == "jsonl":
            return write_jsonl(tmp_path / "data.jsonl", rows)
        return write_parquet(tmp_path / "data.parquet", rows)

    return _write


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_dapo_layout(write):
    path = write(DAPO_ROWS)
    a, b = load_records(path, **DAPO)
    assert (a.prompt, a.answer, a.messages) == ("Solve 1 + 1. Answer: $Answer", "2", DAPO_ROWS[0]["prompt"])
    assert (b.prompt, b.answer, b.messages) == ("What is 1/2 + 1/4?", "\\frac{3}{4}", DAPO_ROWS[1]["prompt"])
    assert a.meta == {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": "a"}}
    assert (b.source, b.row) == (str(path), 2)


def test_gsm8k_layout(write):
    a, b = load_records(write(GSM8K_ROWS), **GSM8K)
    assert (a.prompt, a.answer, a.messages) == (GSM8K_ROWS[0]["question"], "7", None)
    assert b.answer == "1200"
    # without extraction the full solution is the answer
    assert load_records(write(GSM8K_ROWS), prompt_field="question")[0].answer == GSM8K_ROWS[0]["answer"]


def test_numeric_answer_and_blank_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "p", "answer": 42}, "", {"prompt": "q", "answer": 0.5}]
    )
    recs = load_records(path)
    assert [(r.answer, r.row) for r in recs] == [("42", 1), ("0.5", 3)]


def test_format_by_suffix_or_explicit(tmp_path):
    path = write_jsonl(tmp_path / "data.txt", [{"prompt": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"data\.txt.*format"):
        load_records(path)
    assert load_records(path, format="jsonl")[0].answer == "1"


@pytest.mark.parametrize(
    ("lines", "kwargs", "row", "problem"),
    [
        (['{"prompt": "p", "answer": "1"}', "", '{"prompt": "p", "answer": '], {}, 3, "invalid JSON"),
        (
            ['{"question": "q", "answer": "#### 1"}', '{"answer": "#### 2"}'],
            GSM8K,
            2,
            "missing field 'question'",
        ),
        (['{"prompt": "  ", "answer": "1"}'], {}, 1, "empty prompt"),
        (
            ['{"prompt": "p", "answer": "1"}', '{"prompt": "p", "answer": [1]}'],
            {},
            2,
            "must be a string or a number",
        ),
        (['{"prompt": "p", "answer": null}'], {}, 1, "got NoneType"),
        (['["p", "1"]'], {}, 1, "expected a JSON object"),
        (['{"prompt": "p", "reward_model": {}}'], DAPO, 1, "missing field 'reward_model.ground_truth'"),
        (['{"prompt": [], "reward_model": {"ground_truth": "1"}}'], DAPO, 1, "empty prompt"),
        (
            ['{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}'],
            DAPO,
            1,
            "'role' and 'content'",
        ),
        (['{"question": "q", "answer": "7"}'], GSM8K, 1, "no '####'"),
        (['{"prompt": 3, "answer": "1"}'], {}, 1, "string or a chat-messages list"),
    ],
)
def test_malformed_jsonl_names_file_and_row(tmp_path, lines, kwargs, row, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_records(path, **kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{row}: ") and problem in msg and "\n" not in msg


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([{"question": "q", "answer": "#### 1"}, {"question": "", "answer": "#### 2"}], "empty prompt"),
        ([{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "2"}], "no '####'"),
    ],
)
def test_malformed_parquet_names_file_and_row(tmp_path, rows, problem):
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{problem}"):
        load_records(path, **GSM8K)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:1: missing field 'prompt'"):
        load_records(path)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e\.jsonl: the file has no rows"):
        load_records(tmp_path / "e.jsonl")
    write_parquet(tmp_path / "e.parquet", [])
    with pytest.raises(DataError, match=r"e\.parquet: the file has no rows"):
        load_records(tmp_path / "e.parquet")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        load_records(tmp_path / "junk.parquet")


def test_render_with_chat_template(tokenizer, tmp_path):
    rec = PromptRecord(prompt="What is 3 + 4?", answer="7")
    user = [{"role": "user", "content": rec.prompt}]
    assert render_prompt(rec, tokenizer) == tokenizer.apply_chat_template(
        user, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert render_prompt(rec, tokenizer, system_prompt="Be brief.") == tokenizer.apply_chat_template(
        system, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    text = tokenizer.decode(render_prompt(rec, tokenizer))
    assert text == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
    # a messages record renders all of its messages; its own system message wins
    dapo = load_records(write_jsonl(tmp_path / "d.jsonl", DAPO_ROWS), **DAPO)[1]
    expect = tokenizer.apply_chat_template(
        DAPO_ROWS[1]["prompt"], add_generation_prompt=True, return_dict=False
    )
    assert render_prompt(dapo, tokenizer, system_prompt="ignored") == expect


def test_render_plain(tokenizer):
    rec = PromptRecord(prompt="What is 3 + 4?", answer="7")
    assert render_prompt(rec, tokenizer, apply_chat_template=False) == tokenizer(rec.prompt)["input_ids"]
    assert (
        render_prompt(rec, tokenizer, apply_chat_template=False, system_prompt="S")
        == (tokenizer("S\n\nWhat is 3 + 4?")["input_ids"])
    )
    tokenizer_without_template = train_tokenizer()
    tokenizer_without_template.chat_template = None
    assert render_prompt(rec, tokenizer_without_template) == tokenizer(rec.prompt)["input_ids"]


def test_render_too_long_names_row(tokenizer, tmp_path):
    rec = load_records(write_jsonl(tmp_path / "d.jsonl", GSM8K_ROWS), **GSM8K)[1]
    n = len(render_prompt(rec, tokenizer))
    assert len(render_prompt(rec, tokenizer, max_prompt_tokens=n)) == n
    with pytest.raises(
        DataError, match=f"^{re.escape(str(tmp_path / 'd.jsonl'))}:2: prompt has {n} tokens.*={n - 1}"
    ):
        render_prompt(rec, tokenizer, max_prompt_tokens=n - 1)


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.mark.parametrize(
    "task", [ArithmeticTask(), ArithmeticTask(max_operand=99, ops=("+", "-", "*"), nonnegative=False)]
)
def test_arithmetic_answers_are_correct(task):
    recs = task.records(300, seed=3)
    for r in recs:
        a, op, b = r.meta["a"], r.meta["op"], r.meta["b"]
        assert r.prompt == f"What is {a} {op} {b}?"
        assert int(r.answer) == OPS[op](a, b)
        assert min(a, b) >= 0 and max(a, b) <= task.max_operand and op in task.ops
    if task.nonnegative:
        assert all(int(r.answer) >= 0 for r in recs)
    assert {r.meta["op"] for r in recs} == set(task.ops)


def test_arithmetic_deterministic_by_seed():
    task = ArithmeticTask()
    assert task.records(50, seed=1) == task.records(50, seed=1) == arithmetic_records(50, seed=1)
    assert [r.prompt for r in task.records(50, seed=1)] != [r.prompt for r in task.records(50, seed=2)]
    train, evals = task.splits(40, 30, seed=5)
    assert train == task.records(40, seed=10) and evals == task.records(30, seed=11)
    assert [r.prompt for r in train[:30]] != [r.prompt for r in evals]
    assert ArithmeticTask(max_operand=20).records(5, seed=1) != task.records(5, seed=1)


def test_arithmetic_problem_count_and_describe():
    task = ArithmeticTask()
    draws = {(r.meta["a"], r.meta["op"], r.meta["b"]) for r in task.records(5000, seed=0)}
    every = {
        (a, op, b) for op in "+-" for a, b in itertools.product(range(10), repeat=2) if op == "+" or a >= b
    }
    assert draws == every and task.num_problems() == len(every) == 155
    assert "155 distinct problems" in task.describe() and "[0, 9]" in task.describe()
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops=("/",))


@pytest.mark.parametrize("show_work", [False, True])
def test_sft_text_earns_full_reward(show_work):
    task = ArithmeticTask(show_work=show_work)
    math_verify = get_reward("math_verify")
    for r in task.records(20, seed=0):
        target = task.sft_text(r)
        assert target == sft_text(r, show_work=show_work)
        assert target.endswith(r.answer) and (" = " in target) == show_work
        assert exact_match(target, r) == 1.0 and math_verify(target, r) == 1.0
