import json

import pytest
import torch
from conftest import base_tokenizer, build_tokenizer, chat_row, write_jsonl

from modules.config import DataConfig
from modules.data import (
    CHATML_TOKENS,
    PaddingCollator,
    build_datasets,
    load_samples,
    prepare_chat_template,
    print_audit,
    tokenize_example,
)
from modules.errors import UserError
from modules.formats import Example, to_example
from modules.tokens import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def trained_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


def chat(messages, tokenizer, train_on="assistant"):
    return tokenize_example(Example(messages=messages), tokenizer, train_on)


MULTI_TURN = [
    {"role": "system", "content": "Be a pirate."},
    {"role": "user", "content": "Is the sea wide?"},
    {"role": "assistant", "content": "Ahoy! It is."},
    {"role": "user", "content": "Is the ship fast?"},
    {"role": "assistant", "content": "Arr, fast."},
]


def test_only_assistant_tokens_and_their_end_of_turn_are_trained(tokenizer):
    messages = chat_row("What is the capital of France?", "Paris is the capital.", system="Be brief.")["messages"]
    input_ids, labels = chat(messages, tokenizer)
    assert trained_text(tokenizer, input_ids, labels) == "Paris is the capital.<|im_end|>\n"
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == input_ids[i] for i in trained)  # labels are not shifted here; the model shifts
    assert input_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3


@pytest.mark.parametrize(
    ("train_on", "expected"),
    [
        ("assistant", "Ahoy! It is.<|im_end|>\nArr, fast.<|im_end|>\n"),
        ("last_assistant", "Arr, fast.<|im_end|>\n"),
    ],
)
def test_masking_choices_for_multi_turn_conversations(tokenizer, train_on, expected):
    input_ids, labels = chat(MULTI_TURN, tokenizer, train_on)
    assert trained_text(tokenizer, input_ids, labels) == expected


def test_train_on_all_trains_the_prompt_too_but_never_the_first_token(tokenizer):
    input_ids, labels = chat(MULTI_TURN, tokenizer, "all")
    assert labels[0] == IGNORE_INDEX and labels[1:] == input_ids[1:]


def test_the_template_is_not_given_a_second_bos():
    tokenizer = build_tokenizer(bos_token="<|im_start|>")
    input_ids, _ = chat(chat_row("hi", "hello")["messages"], tokenizer)
    assert input_ids[:2] != [tokenizer.bos_token_id] * 2


# ---- Formats ----

FORMAT_ROWS = {
    "messages": chat_row("Is the sea wide?", "Ahoy! It is."),
    "sharegpt": {
        "conversations": [{"from": "human", "value": "Is the sea wide?"}, {"from": "gpt", "value": "Ahoy! It is."}]
    },
    "alpaca": {"instruction": "Is the sea", "input": "wide?", "output": "Ahoy! It is."},
    "prompt_completion": {"prompt": "Is the sea wide? ", "completion": "Ahoy! It is."},
    "text": {"text": "Ahoy! It is."},
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_is_detected_and_trains_the_answer(tmp_path, tokenizer, fmt):
    path = write_jsonl(tmp_path / "rows.jsonl", [FORMAT_ROWS[fmt]] * 3)
    samples, audit, _ = load_samples(str(path), DataConfig(train=str(path)), tokenizer)
    assert audit.format.startswith(f"format {fmt} (detected")
    row = samples[0]
    trained = trained_text(tokenizer, row["input_ids"], row["labels"])
    if fmt == "text":  # every token but the first (nothing predicts it), then EOS
        assert trained == tokenizer.decode(row["input_ids"][1:]) and trained.endswith("It is.<|im_end|>")
    elif fmt == "prompt_completion":  # plain text: the completion and an EOS after it
        assert trained == "Ahoy! It is.<|im_end|>"
        assert tokenizer.decode(row["input_ids"]).startswith("Is the sea wide? ")
    else:
        assert trained == "Ahoy! It is.<|im_end|>\n"
        assert "<|im_start|>user\nIs the sea" in tokenizer.decode(row["input_ids"])


def test_sharegpt_with_role_content_turns_and_alpaca_with_system(tokenizer):
    row = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Arr"}]}
    assert to_example("sharegpt", row, "r").messages[1] == {"role": "assistant", "content": "Arr"}
    alpaca = to_example("alpaca", {"instruction": "Say hi", "input": "", "output": "hi", "system": "Pirate."}, "r")
    assert alpaca.messages == [
        {"role": "system", "content": "Pirate."},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ]


def test_conversational_prompt_completion_trains_only_the_completion(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "Is the sea wide?"}, {"role": "assistant", "content": "Yes."}],
        "completion": [{"role": "user", "content": "Fast?"}, {"role": "assistant", "content": "Arr, fast."}],
    }
    example = to_example("prompt_completion", row, "r")
    input_ids, labels = tokenize_example(example, tokenizer, "assistant")
    assert trained_text(tokenizer, input_ids, labels) == "Arr, fast.<|im_end|>\n"


def test_prompt_completion_with_train_on_all_trains_the_prompt(tokenizer):
    example = to_example("prompt_completion", FORMAT_ROWS["prompt_completion"], "r")
    input_ids, labels = tokenize_example(example, tokenizer, "all")
    assert labels[1:] == input_ids[1:]


def test_auto_prefers_chat_keys_and_says_what_else_fits(tmp_path, tokenizer):
    rows = [{**chat_row("Is the sea wide?", "Ahoy!"), "text": "a flattened copy"}] * 2
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    _, audit, _ = load_samples(str(path), DataConfig(train=str(path)), tokenizer)
    assert "format messages" in audit.format and "also fit text" in audit.format
    _, explicit, _ = load_samples(str(path), DataConfig(train=str(path), format="text"), tokenizer)
    assert explicit.format == "format text (set in data.format)"


@pytest.mark.parametrize(
    ("rows", "config", "message"),
    [
        ([{"question": "a", "answer": "b"}], {}, r"cannot tell the row format from the keys \['answer', 'question'\]"),
        ([{"messages": []}], {"format": "alpaca"}, r"data.format is alpaca, which needs the keys"),
        (
            [FORMAT_ROWS["alpaca"], {"instruction": "x", "input": "y", "output": None}],
            {},
            r"rows.jsonl row 2: format alpaca needs \['instruction', 'output'\], but \['output'\] missing; "
            r"keys found: \['input', 'instruction'\]",
        ),
        ([chat_row("a", "b"), "{not json"], {}, r"rows.jsonl line 2: not valid JSON"),
        ([chat_row("a", "b"), "[1, 2]"], {}, r"line 2: each line must be a JSON object"),
        ([{"messages": []}], {}, r"row 1: needs a non-empty list of \{role, content\} turns"),
        ([{"messages": [{"role": "pirate", "content": "arr"}]}], {}, r"row 1, turn 1: unknown role 'pirate'"),
        ([{"conversations": [{"from": "parrot", "value": "arr"}]}], {}, r"row 1, turn 1: unknown role 'parrot'"),
        ([{"messages": [{"role": "user", "content": "only a question"}]}], {}, r"row 1: has no assistant turn"),
        ([{"messages": [{"role": "user", "content": 3}]}], {}, r"turn 1: each turn needs a 'role' and a string"),
        ([{"prompt": "a", "completion": ["b"]}], {}, r"row 1: prompt and completion must both be strings"),
    ],
)
def test_bad_rows_are_named_with_file_and_line(tmp_path, tokenizer, rows, config, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match=message):
        load_samples(str(path), DataConfig(train=str(path), **config), tokenizer)


# ---- Sources ----


def test_json_parquet_csv_and_folders_are_read(tmp_path, tokenizer):
    import datasets

    rows = [FORMAT_ROWS["alpaca"] | {"output": f"Ahoy {i}!"} for i in range(4)]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=1))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "rows.csv"), index=False)
    folder = tmp_path / "shards"
    folder.mkdir()
    for half in (0, 1):
        write_jsonl(folder / f"part-{half}.jsonl", rows[2 * half : 2 * half + 2])
    for spec in ("rows.json", "rows.parquet", "rows.csv", "shards"):
        samples, audit, _ = load_samples(str(tmp_path / spec), DataConfig(train=str(tmp_path / spec)), tokenizer)
        assert audit.rows_read == 4 and "format alpaca" in audit.format, spec
        answers = sorted(trained_text(tokenizer, r["input_ids"], r["labels"]) for r in samples)
        assert answers == [f"Ahoy {i}!<|im_end|>\n" for i in range(4)], spec


def test_missing_unsupported_and_non_utf8_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="missing.jsonl does not exist"):
        load_samples(str(tmp_path / "missing.jsonl"), DataConfig(train="x"), tokenizer)
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(UserError, match=r"unsupported type '.txt'"):
        load_samples(str(tmp_path / "rows.txt"), DataConfig(train="x"), tokenizer)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.jsonl line 1 is not UTF-8"):
        load_samples(str(path), DataConfig(train=str(path)), tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no .jsonl"):
        load_samples(str(tmp_path / "empty"), DataConfig(train="x"), tokenizer)


# ---- Truncation, dropping, the audit ----

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20


def test_truncate_keeps_long_rows_cut_and_drops_rows_with_nothing_left(tmp_path, tokenizer):
    rows = [chat_row("hi", "Ahoy!"), chat_row(LONG_PROMPT, "Arr!"), chat_row("hi", "Ahoy! " + LONG_PROMPT)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    samples, audit, _ = load_samples(str(path), DataConfig(train=str(path), max_seq_len=32), tokenizer)
    assert (len(samples), audit.rows_read, audit.rows_kept, audit.rows_truncated) == (2, 3, 2, 2)
    assert audit.dropped == {"with no trained token (e.g. all cut off by max_seq_len)": 1}
    assert all(len(ids) <= 32 for ids in samples["input_ids"])
    assert audit.tokens == sum(len(ids) for ids in samples["input_ids"])
    trained = sum(label != IGNORE_INDEX for labels in samples["labels"] for label in labels)
    assert audit.trained_tokens == trained and 0 < audit.trained_token_fraction < 1


def test_drop_removes_every_long_row_and_counts_it(tmp_path, tokenizer):
    rows = [chat_row("hi", "Ahoy!"), chat_row(LONG_PROMPT, "Arr!"), chat_row("hi", "Ahoy! " + LONG_PROMPT)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = DataConfig(train=str(path), max_seq_len=32, truncation="drop")
    samples, audit, _ = load_samples(str(path), config, tokenizer)
    assert len(samples) == 1 and audit.rows_truncated == 0
    assert audit.dropped == {"longer than max_seq_len 32 (data.truncation: drop)": 2}


def test_a_dataset_with_nothing_trainable_is_refused_with_the_reasons(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row(LONG_PROMPT, "Arr!")])
    with pytest.raises(UserError, match=r"no trainable rows remain \(rows read 1, kept 0, dropped: 1 with no trained"):
        load_samples(str(path), DataConfig(train=str(path), max_seq_len=16), tokenizer)


def test_audit_example_marks_trained_tokens_in_logs_and_colours_them_in_a_terminal(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row("Is the sea wide?", "Ahoy! It is.")])
    _, audit, _ = load_samples(str(path), DataConfig(train=str(path)), tokenizer)
    plain = audit.render_example(colour=False)
    assert plain == "<|im_start|>user\nIs the sea wide?<|im_end|>\n<|im_start|>assistant\n[[Ahoy! It is.<|im_end|>\n]]"
    coloured = audit.render_example(colour=True)
    assert "\033[32mAhoy! It is.<|im_end|>\n\033[0m" in coloured and "[[" not in coloured
    print_audit(audit)  # captured output is not a terminal: markers, not colour codes
    out = capsys.readouterr().out
    assert "[[Ahoy! It is." in out and "\033[" not in out and "format messages" in out
    assert audit.numbers()["trained_token_fraction"] == pytest.approx(audit.trained_tokens / audit.tokens)


# ---- Chat templates ----


def test_a_tokenizer_without_a_template_gets_chatml_with_its_tokens_to_train():
    tokenizer = base_tokenizer()
    size = len(tokenizer)
    description, ids = prepare_chat_template(tokenizer, "auto", chat=True)
    assert "ChatML" in description and len(tokenizer) == size + 2
    assert ids == tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS)) and all(i >= size for i in ids)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token not in (None, "<|im_end|>")
    input_ids, labels = chat(MULTI_TURN, tokenizer)
    assert trained_text(tokenizer, input_ids, labels) == "Ahoy! It is.<|im_end|>\nArr, fast.<|im_end|>\n"
    assert prepare_chat_template(tokenizer, "auto", chat=True)[1] == []  # now it has one: nothing more to add


def test_template_choices(tokenizer):
    with pytest.raises(UserError, match="data.chat_template is tokenizer, but the tokenizer has no chat template"):
        prepare_chat_template(base_tokenizer(), "tokenizer", chat=True)
    assert prepare_chat_template(base_tokenizer(), "auto", chat=False) == ("none (plain text rows)", [])
    own = build_tokenizer()
    assert prepare_chat_template(own, "auto", chat=True) == ("the tokenizer's", [])
    _, ids = prepare_chat_template(own, "chatml", chat=True)  # its ChatML tokens exist already; still trained
    assert ids == own.convert_tokens_to_ids(list(CHATML_TOKENS))


# ---- Cache, eval split, collator ----


def test_tokenization_is_cached_and_the_cache_follows_data_and_settings(tmp_path, tokenizer, monkeypatch):
    import modules.data as data_module

    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row(f"q {i}", f"Ahoy {i}!") for i in range(6)])
    config = DataConfig(train=str(path))
    first, audit, _ = load_samples(str(path), config, tokenizer)
    assert not audit.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite the cache")

    real = data_module.tokenize_rows
    monkeypatch.setattr(data_module, "tokenize_rows", no_tokenizing)
    again, cached, _ = load_samples(str(path), config, tokenizer)
    assert cached.from_cache and cached.tokens == audit.tokens and cached.example == audit.example
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    with pytest.raises(AssertionError, match="tokenized again"):
        load_samples(str(path), config.model_copy(update={"max_seq_len": 64}), tokenizer)
    write_jsonl(path, [chat_row(f"q {i}", f"Arr {i}!") for i in range(6)])  # same size, new content
    with pytest.raises(AssertionError, match="tokenized again"):
        load_samples(str(path), config, tokenizer)
    monkeypatch.setattr(data_module, "tokenize_rows", real)
    _, off, _ = load_samples(str(path), config.model_copy(update={"cache": False}), tokenizer)
    assert not off.from_cache


def test_eval_fraction_holds_out_a_seeded_disjoint_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row(f"question {i}", f"answer {i}") for i in range(20)])
    config = DataConfig(train=str(path), eval_fraction=0.25, packing=False)
    first, again, other = (build_datasets(config, tokenizer, seed) for seed in (3, 3, 4))
    assert (len(first.train), len(first.eval), first.audit.eval_rows) == (15, 5, 5)
    as_rows = lambda dataset: {tuple(ids) for ids in dataset["input_ids"]}  # noqa: E731
    assert not as_rows(first.train) & as_rows(first.eval)
    assert as_rows(first.eval) == as_rows(again.eval) and as_rows(first.train) == as_rows(again.train)
    assert as_rows(first.eval) != as_rows(other.eval)
    assert build_datasets(DataConfig(train=str(path)), tokenizer, seed=3).eval is None


def test_collator_pads_right_with_pad_token_and_ignore_index():
    collate = PaddingCollator(pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_guanaco_text_is_rewritten_as_chat_rows(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    rows = [
        {"text": "### Human: Is the sea wide?### Assistant: Ahoy! It is.### Human: Fast?### Assistant: Arr."},
        {"text": "### Assistant: answer first"},
    ]
    source = write_jsonl(tmp_path / "guanaco.jsonl", rows)
    out = tmp_path / "chat.jsonl"
    script = REPO / "data" / "guanaco_to_messages.py"
    done = subprocess.run([sys.executable, str(script), str(source), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 conversations written" in done.stdout and "1 rows skipped" in done.stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["messages"] == [
        {"role": "user", "content": "Is the sea wide?"},
        {"role": "assistant", "content": "Ahoy! It is."},
        {"role": "user", "content": "Fast?"},
        {"role": "assistant", "content": "Arr."},
    ]
    again = subprocess.run([sys.executable, str(script), str(source), str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(out.read_text().splitlines()[0]) == row  # the first output is left as it was


def test_a_template_that_is_not_prefix_stable_is_named_with_the_row(tmp_path):
    tokenizer = build_tokenizer()
    # Drops earlier assistant turns once a later one follows, as some reasoning templates do.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    path = write_jsonl(tmp_path / "rows.jsonl", [{"messages": MULTI_TURN}])
    with pytest.raises(UserError, match=r"rows.jsonl row 1: the chat template renders earlier turns differently"):
        load_samples(str(path), DataConfig(train=str(path)), tokenizer)
    samples, _, _ = load_samples(str(path), DataConfig(train=str(path), train_on="last_assistant"), tokenizer)
    assert trained_text(tokenizer, samples[0]["input_ids"], samples[0]["labels"]) == "Arr, fast.<|im_end|>\n"


def test_parallel_tokenization_gives_the_serial_result_and_names_bad_rows(tmp_path, tokenizer, monkeypatch):
    import modules.data as data_module

    rows = [chat_row(f"question {i}", "Ahoy! " * (1 + i % 5)) for i in range(40)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = DataConfig(train=str(path), cache=False)
    serial, _, _ = load_samples(str(path), config, tokenizer)
    monkeypatch.setattr(data_module, "PARALLEL_FROM_ROWS", 10)  # 40 rows: two worker processes
    parallel, audit, _ = load_samples(str(path), config, tokenizer)
    assert parallel["input_ids"] == serial["input_ids"] and parallel["labels"] == serial["labels"]
    assert audit.rows_read == 40
    write_jsonl(path, [*rows[:35], {"messages": [{"role": "pirate", "content": "arr"}]}, *rows[35:]])
    with pytest.raises(UserError, match=r"rows.jsonl row 36, turn 1: unknown role 'pirate'"):
        load_samples(str(path), config, tokenizer)
