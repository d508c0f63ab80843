"""Training data: chat rows rendered by the tokenizer's chat template, labels on assistant tokens only.

Labels come from character spans of the rendered conversation: each assistant turn spans from the
end of the conversation-so-far rendered with a generation prompt to the end of the conversation
including that turn (so its end-of-turn token is trained and the model learns to stop). Tokens are
mapped to spans with the fast tokenizer's offsets, never by searching for marker tokens.
"""

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules.config import DataConfig
from modules.errors import UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class DataAudit:
    rows_read: int = 0
    rows_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    eval_rows: int = 0

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / max(self.tokens, 1)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        return (
            f"rows read {self.rows_read}, kept {self.rows_kept}, dropped: {dropped}; "
            f"truncated {self.rows_truncated}; tokens {self.tokens:,}, "
            f"trained {self.trained_tokens:,} ({self.trained_token_fraction:.1%})"
            + (f"; eval rows {self.eval_rows}" if self.eval_rows else "")
        )


def build_datasets(data: DataConfig, tokenizer, seed: int):
    """Train and eval datasets (eval is None without data.eval or data.eval_fraction), and the audit."""
    train_set, audit = tokenize_file(Path(data.train), data, tokenizer)
    eval_set = None
    if data.eval:
        eval_set, _ = tokenize_file(Path(data.eval), data, tokenizer)
    elif data.eval_fraction:
        split = train_set.train_test_split(test_size=data.eval_fraction, seed=seed)
        train_set, eval_set = split["train"], split["test"]
    audit.eval_rows = len(eval_set) if eval_set is not None else 0
    return train_set, eval_set, audit


def tokenize_file(path: Path, data: DataConfig, tokenizer):
    """Read, validate and tokenize one JSONL file. Returns (datasets.Dataset, DataAudit)."""
    rows = read_jsonl(path)
    audit = DataAudit(rows_read=len(rows))

    def tokenize(row, index):
        where = f"{path} row {index + 1}"
        if not isinstance(row.get("messages"), list):
            found = ", ".join(key for key, value in row.items() if value is not None)
            raise UserError(f"{where}: expected chat rows with a 'messages' list; keys found: {found}.")
        messages = check_messages(row["messages"], where)
        input_ids, labels = tokenize_conversation(messages, tokenizer)
        truncated = len(input_ids) > data.max_seq_len
        input_ids, labels = input_ids[: data.max_seq_len], labels[: data.max_seq_len]
        trained = sum(label != IGNORE_INDEX for label in labels)
        return {"input_ids": input_ids, "labels": labels, "truncated": truncated, "trained": trained}

    tokenized = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names)
    audit.rows_truncated = sum(tokenized["truncated"])
    no_labels = sum(trained == 0 for trained in tokenized["trained"])
    if no_labels:
        audit.dropped["with no assistant token left after truncation"] = no_labels
    kept = tokenized.filter(lambda row: row["trained"] > 0)
    audit.tokens = sum(len(ids) for ids in kept["input_ids"])
    audit.trained_tokens = sum(kept["trained"])
    if len(kept) == 0:
        raise UserError(
            f"{path}: no trainable rows remain ({audit.summary()}). "
            "Raise data.max_seq_len or check that rows have assistant turns."
        )
    return kept.remove_columns(["truncated", "trained"]), audit


def read_jsonl(path: Path):
    """Load a JSONL file with `datasets`; a malformed line is reported with its line number."""
    import datasets

    if not path.is_file():
        raise UserError(f"data file {path} does not exist; give a JSONL file of chat rows (data.train, data.eval).")
    _check_utf8(path)  # pyarrow reads invalid UTF-8 without complaint and fails much later
    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception:
        _find_bad_line(path)  # raises a UserError naming the line when the file is malformed
        raise


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                raise UserError(f"{path} line {number} is not UTF-8 text; re-save the file as UTF-8.") from None


def _find_bad_line(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: each line must be a JSON object, got {type(row).__name__}.")


def check_messages(messages, where: str) -> list[dict]:
    """A conversation must be a list of {role, content} turns with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: needs a non-empty 'messages' list of {{role, content}} turns.")
    for turn_number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise UserError(f"{where}, turn {turn_number}: each turn needs a 'role' and a string 'content'.")
        if turn.get("role") not in ROLES:
            raise UserError(
                f"{where}, turn {turn_number}: unknown role {turn.get('role')!r}; allowed: {', '.join(ROLES)}."
            )
    if messages[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation starts with an assistant turn; start with system or user.")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise UserError(f"{where}: has no assistant turn, so nothing would be trained.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return it with the character span of every assistant turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(
                "the chat template renders earlier turns differently once later turns follow, so "
                "assistant spans cannot be located; use a model whose template is prefix-stable."
            )
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(messages, tokenizer)
    # The template already writes BOS/turn tokens: adding special tokens again would double BOS.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    return encoded["input_ids"], labels


@dataclass
class PaddingCollator:
    """Pads each batch to its longest row: input with the pad token, labels with -100, on the right."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), longest), dtype=torch.long),
            "labels": torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long),
        }
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            batch["input_ids"][i, :length] = torch.tensor(row["input_ids"])
            batch["attention_mask"][i, :length] = 1
            batch["labels"][i, :length] = torch.tensor(row["labels"])
        return batch
