import pytest
import torch
from conftest import build_tokenizer, chat_row, write_jsonl

from modules.config import DataConfig
from modules.data import IGNORE_INDEX, PaddingCollator, tokenize_conversation, tokenize_file
from modules.errors import UserError


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def trained_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(input_ids, labels, strict=True) if label != IGNORE_INDEX])


def test_only_assistant_tokens_and_their_end_of_turn_are_trained(tokenizer):
    messages = chat_row("What is the capital of France?", "Paris is the capital.", system="Be brief.")["messages"]
    input_ids, labels = tokenize_conversation(messages, tokenizer)
    assert trained_text(tokenizer, input_ids, labels) == "Paris is the capital.<|im_end|>\n"
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all(labels[i] == input_ids[i] for i in trained)  # labels are not shifted here; the model shifts
    assert input_ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 3


def test_every_assistant_turn_of_a_multi_turn_conversation_is_trained(tokenizer):
    messages = [
        {"role": "user", "content": "Is the sea wide?"},
        {"role": "assistant", "content": "Ahoy! It is."},
        {"role": "user", "content": "Is the ship fast?"},
        {"role": "assistant", "content": "Arr, fast."},
    ]
    input_ids, labels = tokenize_conversation(messages, tokenizer)
    assert trained_text(tokenizer, input_ids, labels) == "Ahoy! It is.<|im_end|>\nArr, fast.<|im_end|>\n"


def test_the_template_is_not_given_a_second_bos(tmp_path):
    tokenizer = build_tokenizer(bos_token="<|im_start|>")
    messages = chat_row("hi", "hello")["messages"]
    input_ids, _ = tokenize_conversation(messages, tokenizer)
    assert input_ids[:2] != [tokenizer.bos_token_id] * 2


def test_build_truncates_and_drops_rows_with_nothing_left_to_train(tmp_path, tokenizer):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row("hi", "Ahoy!"), chat_row(long_prompt, "Arr!")])
    dataset, audit = tokenize_file(path, DataConfig(train=str(path), max_seq_len=32), tokenizer)
    assert len(dataset) == 1 and audit.rows_read == 2 and audit.rows_kept == 1
    assert audit.dropped == {"with no assistant token left after truncation": 1}
    assert audit.rows_truncated == 1
    assert 0 < audit.trained_token_fraction < 1
    assert all(len(ids) <= 32 for ids in dataset["input_ids"])


def test_a_dataset_with_nothing_trainable_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row("The quick brown fox " * 20, "Arr!")])
    with pytest.raises(UserError, match="no trainable rows remain"):
        tokenize_file(path, DataConfig(train=str(path), max_seq_len=16), tokenizer)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([chat_row("a", "b"), "{not json"], r"rows.jsonl line 2: not valid JSON"),
        ([chat_row("a", "b"), "[1, 2]"], r"line 2: each line must be a JSON object"),
        ([{"text": "hello"}], r"row 1: expected chat rows with a 'messages' list; keys found: text"),
        ([{"messages": []}], r"row 1: needs a non-empty 'messages' list"),
        ([{"messages": [{"role": "pirate", "content": "arr"}]}], r"row 1, turn 1: unknown role 'pirate'"),
        ([{"messages": [{"role": "user", "content": "only a question"}]}], r"row 1: has no assistant turn"),
        ([{"messages": [{"role": "user", "content": 3}]}], r"turn 1: each turn needs a 'role' and a string"),
    ],
)
def test_bad_rows_are_named_with_file_and_line(tmp_path, tokenizer, rows, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(UserError, match=message):
        tokenize_file(path, DataConfig(train=str(path)), tokenizer)


def test_missing_and_non_utf8_files(tmp_path, tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        tokenize_file(tmp_path / "missing.jsonl", DataConfig(train="missing.jsonl"), tokenizer)
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.jsonl line 1 is not UTF-8"):
        tokenize_file(path, DataConfig(train=str(path)), tokenizer)


def test_collator_pads_right_with_pad_token_and_ignore_index():
    collate = PaddingCollator(pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_eval_fraction_holds_out_a_seeded_disjoint_split(tmp_path, tokenizer):
    from modules.data import build_datasets

    path = write_jsonl(tmp_path / "rows.jsonl", [chat_row(f"question {i}", f"answer {i}") for i in range(20)])
    config = DataConfig(train=str(path), eval_fraction=0.25)
    train, held_out, audit = build_datasets(config, tokenizer, seed=3)
    again_train, again_held_out, _ = build_datasets(config, tokenizer, seed=3)
    _, other_held_out, _ = build_datasets(config, tokenizer, seed=4)
    assert (len(train), len(held_out), audit.eval_rows) == (15, 5, 5)
    as_rows = lambda dataset: {tuple(ids) for ids in dataset["input_ids"]}  # noqa: E731
    assert not as_rows(train) & as_rows(held_out)
    assert as_rows(held_out) == as_rows(again_held_out) and as_rows(train) == as_rows(again_train)
    assert as_rows(held_out) != as_rows(other_held_out)
    assert build_datasets(DataConfig(train=str(path)), tokenizer, seed=3)[1] is None
