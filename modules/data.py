"""Training data: read rows of any supported format, tokenize them with labels, audit, cache, pack.

Labels come from character spans of the rendered text, mapped to tokens with the fast tokenizer's
offsets, never by searching for marker tokens. For chat rows, each assistant turn spans from the end
of the conversation-so-far rendered with a generation prompt to the end of the conversation
including that turn, so its end-of-turn token is trained and the model learns to stop. The first
token of every sample is never a label (nothing precedes it).
"""

import codecs
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jinja2 import TemplateError

from modules.config import DataConfig
from modules.errors import UserError
from modules.formats import Example, detect_format, is_chat_format, to_example
from modules.packing import PackedDataset
from modules.sources import cache_root
from modules.tokens import IGNORE_INDEX, choose_pad_token, scored_positions

CACHE_VERSION = 1  # bump when tokenization changes what it produces
FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?(:[\w.\[\]%:+-]+)?")  # name or owner/name, then :split
PARALLEL_FROM_ROWS = 20_000  # below this, starting worker processes costs more than it saves


@dataclass
class DataAudit:
    """What the data pipeline did, printed before training and logged to W&B."""

    source: str = ""
    format: str = ""
    chat_template: str = ""
    rows_read: int = 0
    rows_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    trained_tokens: int = 0
    eval_rows: int = 0
    packed_rows: int = 0
    packing_efficiency: float | None = None
    example: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) pieces of one sample
    from_cache: bool = False

    @property
    def rows_kept(self) -> int:
        return self.rows_read - sum(self.dropped.values())

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / max(self.tokens, 1)

    def summary(self) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in self.dropped.items()) or "none"
        packing = (
            f"; packed into {self.packed_rows} rows, {self.packing_efficiency:.1%} of slots filled"
            if self.packing_efficiency is not None
            else ""
        )
        return (
            f"rows read {self.rows_read}, kept {self.rows_kept}, dropped: {dropped}; "
            f"truncated {self.rows_truncated}; tokens {self.tokens:,}, "
            f"trained {self.trained_tokens:,} ({self.trained_token_fraction:.1%})"
            + (f"; eval rows {self.eval_rows}" if self.eval_rows else "")
            + packing
        )

    def numbers(self) -> dict:
        """The audit as flat numbers, for W&B and the run folder."""
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            **{f"dropped/{reason}": n for reason, n in self.dropped.items()},
            "rows_truncated": self.rows_truncated,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "trained_token_fraction": self.trained_token_fraction,
            "eval_rows": self.eval_rows,
            "packed_rows": self.packed_rows,
            "packing_efficiency": self.packing_efficiency,
        }

    def render_example(self, colour: bool) -> str:
        """The example sample with trained tokens told apart: green in a terminal, [[...]] in logs.

        A long sample shows its start, its first trained span and its end, with what lies between elided.
        """
        pieces = elide(self.example)
        if colour:
            return "".join(
                text if trained is None else f"\033[32m{text}\033[0m" if trained else f"\033[2m{text}\033[0m"
                for text, trained in pieces
            )
        return "".join(text if trained is None else f"[[{text}]]" if trained else text for text, trained in pieces)


EXAMPLE_HEAD, EXAMPLE_TRAINED, EXAMPLE_TAIL = 400, 400, 300  # characters of a long sample that are shown


def elide(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool | None]]:
    """Keep a long sample's start, first trained span and end; a (marker, None) piece stands for each gap."""
    total = sum(len(text) for text, _ in pieces)
    if total <= EXAMPLE_HEAD + EXAMPLE_TRAINED + EXAMPLE_TAIL:
        return list(pieces)
    starts = [0]
    for text, _ in pieces:
        starts.append(starts[-1] + len(text))
    first_trained = next((starts[i] for i, (_, trained) in enumerate(pieces) if trained), 0)
    wanted = [(0, EXAMPLE_HEAD), (first_trained, first_trained + EXAMPLE_TRAINED), (total - EXAMPLE_TAIL, total)]
    ranges: list[list[int]] = []
    for low, high in sorted(wanted):
        if ranges and low <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], high)
        else:
            ranges.append([low, high])
    shown: list[tuple[str, bool | None]] = []
    cursor = 0
    for low, high in ranges:
        if low > cursor:
            shown.append((f" [... {low - cursor:,} characters ...] ", None))
        for (text, trained), start in zip(pieces, starts, strict=False):
            part = text[max(low - start, 0) : max(high - start, 0)]
            if part:
                shown.append((part, trained))
        cursor = high
    return shown


@dataclass
class Datasets:
    train: object  # datasets.Dataset of samples, or a PackedDataset of bins
    eval: object | None
    audit: DataAudit
    trainable_token_ids: list[int]  # token rows to train (new chat-template tokens), empty if none


def build_datasets(data: DataConfig, tokenizer, seed: int) -> Datasets:
    """Read, tokenize (or load from the cache), split and pack the train and eval data."""
    train_set, audit, trainable = load_samples(data.train, data, tokenizer)
    eval_set = None
    if data.eval:
        eval_set, _, _ = load_samples(data.eval, data, tokenizer)
    elif data.eval_fraction:
        held_out = math.ceil(data.eval_fraction * len(train_set))  # as datasets rounds it
        if held_out < 1 or len(train_set) - held_out < 1:
            raise UserError(
                f"data.eval_fraction {data.eval_fraction} of {len(train_set)} usable row(s) of {data.train} leaves "
                f"{held_out} eval and {len(train_set) - held_out} train row(s); each needs at least one. Use more "
                "rows, another fraction, or give data.eval."
            )
        split = train_set.train_test_split(test_size=data.eval_fraction, seed=seed)
        train_set, eval_set = split["train"], split["test"]
    audit.eval_rows = len(eval_set) if eval_set is not None else 0
    if data.packing:
        train_set = PackedDataset(train_set, data.max_seq_len)
        audit.packed_rows, audit.packing_efficiency = len(train_set), train_set.efficiency
        eval_set = PackedDataset(eval_set, data.max_seq_len) if eval_set is not None else None
    return Datasets(train_set, eval_set, audit, trainable)


def load_samples(spec: str, data: DataConfig, tokenizer):
    """Tokenized samples of one source, its audit, and the token ids a new chat template needs trained."""
    rows, source, fingerprint = read_rows(spec)
    fmt, how = detect_format(rows.column_names, data.format, source)
    chat = is_chat_format(fmt, rows[0]) if len(rows) else fmt != "text"
    template, trainable = prepare_chat_template(tokenizer, data.chat_template, chat)
    samples, audit = tokenize_cached(rows, source, fingerprint, fmt, data, tokenizer)
    audit.source, audit.format, audit.chat_template = source, how, template
    return samples, audit, trainable


# ---- Sources: files, folders, hub datasets ----


def read_rows(spec: str):
    """The rows at `spec` (file, folder, or hub id with an optional :split): (Dataset, name, fingerprint)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FILE_KINDS and p.is_file())
        kinds = {FILE_KINDS[p.suffix] for p in files}
        if not files:
            raise UserError(f"data folder {spec} holds no {'/'.join(FILE_KINDS)} files.")
        if len(kinds) > 1:
            raise UserError(
                f"data folder {spec} mixes file types ({', '.join(sorted(kinds))}); keep one type per folder."
            )
        return _load_files(files, kinds.pop()), spec, _files_digest(files)
    if path.is_file():
        if path.suffix not in FILE_KINDS:
            raise UserError(f"data file {spec}: unsupported type {path.suffix!r}; use one of {', '.join(FILE_KINDS)}.")
        return _load_files([path], FILE_KINDS[path.suffix]), spec, _files_digest([path])
    if path.suffix in FILE_KINDS or not HUB_ID.fullmatch(spec):
        raise UserError(f"data file {spec} does not exist; give a data file, a folder of them, or a hub dataset id.")
    rows = _load_hub(spec)
    return rows, spec, rows._fingerprint


def _files_digest(files: list[Path]) -> str:
    """A hash of the files' contents: the tokenization cache follows edits, not timestamps."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _load_files(files: list[Path], kind: str):
    import logging

    import datasets

    # datasets logs its own error before raising; the UserError below says it with the file and line.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    for path in files:
        _check_utf8(path)  # pyarrow reads invalid UTF-8 without complaint and fails much later
        _check_not_empty(path)
    if kind == "json" and len(files) > 1:
        _check_same_keys(files)
    try:
        return datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train")
    except Exception as error:
        if kind == "json":
            for path in files:
                _find_bad_line(path)  # raises a UserError naming the line when a file is malformed
        raise UserError(f"could not read {', '.join(map(str, files))} as {kind}: {error}") from None


def _check_not_empty(path: Path) -> None:
    if path.suffix == ".parquet":
        return
    with open(path, "rb") as handle:
        if any(line.strip() for line in handle):
            return
    holds = "only whitespace" if path.stat().st_size else "nothing: it is empty"
    raise UserError(
        f"data file {path} has no rows (it holds {holds}). Give a file with one JSON object per line "
        "(see Data formats in the README), or remove it."
    )


def _check_same_keys(files: list[Path]) -> None:
    """Files of one folder are read as one table: their rows must share one format."""
    keys_by_file = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        try:
            row = json.loads(first) if path.suffix == ".jsonl" else None
        except ValueError:
            row = None
        if isinstance(row, dict):
            keys_by_file[path.name] = sorted(row)
    if len({tuple(keys) for keys in keys_by_file.values()}) > 1:
        found = "; ".join(f"{name}: {keys}" for name, keys in keys_by_file.items())
        raise UserError(
            f"data folder {files[0].parent} mixes row formats (first row keys by file: {found}). Put files of "
            "one format in a folder, or convert them to one format (see Data formats in the README)."
        )


def _load_hub(spec: str):
    import datasets

    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"data {spec!r} is not a local file or folder, and loading it as a hub dataset (split "
            f"{split or 'train'!r}) failed: {first}. Check the path, or the dataset id and split (id:split)."
        ) from None


def _check_utf8(path: Path) -> None:
    if path.suffix == ".parquet":
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                decoder.decode(line)
            except UnicodeDecodeError:
                raise UserError(f"{path} line {number} is not UTF-8 text; re-save the file as UTF-8.") from None


def _find_bad_line(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} line {error.lineno}: not valid JSON ({error.msg}, column {error.colno})."
            ) from None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error.msg}, column {error.colno}).") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number}: each line must be a JSON object, got {type(row).__name__}.")


# ---- Chat templates ----


def prepare_chat_template(tokenizer, choice: str, chat: bool) -> tuple[str, list[int]]:
    """Give the tokenizer the template chat rows need; returns its description and the token ids to train.

    A tokenizer with no template (a base model) gets ChatML. Its <|im_start|>/<|im_end|> rows are
    then trained (embedding and lm_head) and saved with the adapter, and <|im_end|> becomes EOS so
    generation stops at the end of a turn.
    """
    if not chat:
        return "none (plain text rows)", []
    has_template = bool(tokenizer.chat_template)
    if choice == "tokenizer" and not has_template:
        raise UserError(
            "data.chat_template is tokenizer, but the tokenizer has no chat template. Use auto or chatml "
            "(ChatML with trained new tokens), or save a chat_template into the model folder."
        )
    if choice == "tokenizer" or (choice == "auto" and has_template):
        return "the tokenizer's", []
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.eos_token = CHATML_TOKENS[1]
    choose_pad_token(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(CHATML_TOKENS))
    return f"ChatML (the tokenizer has none; {' and '.join(CHATML_TOKENS)} rows are trained)", ids


# ---- Tokenization, with a cache ----


def tokenize_cached(rows, source: str, fingerprint: str, fmt: str, data: DataConfig, tokenizer):
    """Tokenized samples and their audit, from the cache when this exact job ran before."""
    import datasets

    key = cache_key(fingerprint, fmt, data, tokenizer)
    folder = tokenized_cache() / key
    if data.cache and (folder / "audit.json").is_file():
        audit = DataAudit(**json.loads((folder / "audit.json").read_text()))
        audit.example = [tuple(piece) for piece in audit.example]
        audit.from_cache = True
        return datasets.load_from_disk(str(folder / "samples")), audit
    samples, audit = tokenize_rows(rows, source, fmt, data, tokenizer)
    if data.cache:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        samples.save_to_disk(str(staging / "samples"))
        (staging / "audit.json").write_text(json.dumps(asdict(audit)))
        try:
            os.replace(staging, folder)
        except OSError:  # another process cached the same job first
            shutil.rmtree(staging, ignore_errors=True)
        samples = datasets.load_from_disk(str(folder / "samples"))  # memory-mapped, like a cache hit
    return samples, audit


def tokenized_cache() -> Path:
    return Path(os.environ.get("QLORA_LOOP_DATA_CACHE", cache_root() / "tokenized"))


def cache_key(fingerprint: str, fmt: str, data: DataConfig, tokenizer) -> str:
    """A hash of everything tokenization depends on: rows, format, settings, tokenizer and template."""
    digest = hashlib.sha256()
    parts = {
        "version": CACHE_VERSION,
        "rows": fingerprint,
        "format": fmt,
        "settings": [data.max_seq_len, data.truncation, data.train_on],
        "template": tokenizer.chat_template,
        "special": {name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
    }
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()[:24]


def tokenize_rows(rows, source: str, fmt: str, data: DataConfig, tokenizer):
    """Tokenize every row (in parallel for large datasets), then drop rows with nothing to train."""
    audit = DataAudit(rows_read=len(rows))
    limit = data.max_seq_len

    def tokenize(row, index):
        where = f"{source} row {index + 1}"
        example = to_example(fmt, row, where)  # a bad row raises a UserError naming it
        try:
            input_ids, labels = tokenize_example(example, tokenizer, data.train_on)
        except UserError as error:  # the template could not be read for this row
            raise UserError(f"{where}: {error}") from None
        too_long = len(input_ids) > limit
        if too_long and data.truncation == "truncate":
            input_ids, labels = input_ids[:limit], labels[:limit]
        trained = sum(label != IGNORE_INDEX for label in labels)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "length": len(input_ids),
            "trained": trained,
            "too_long": too_long,
        }

    workers = min(os.cpu_count() or 1, 8) if len(rows) >= PARALLEL_FROM_ROWS else None
    tokenized = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, num_proc=workers)
    drop_long = data.truncation == "drop"
    too_long = sum(tokenized["too_long"])
    if drop_long and too_long:
        audit.dropped[f"longer than max_seq_len {limit} (data.truncation: drop)"] = too_long
    elif too_long:
        audit.rows_truncated = too_long
    flags = zip(tokenized["too_long"], tokenized["trained"], strict=True)
    no_labels = sum(trained == 0 and not (drop_long and long) for long, trained in flags)
    if no_labels:
        audit.dropped["with no trained token (e.g. all cut off by max_seq_len)"] = no_labels
    kept = tokenized.filter(lambda row: row["trained"] > 0 and not (drop_long and row["too_long"]))
    audit.tokens = sum(kept["length"])
    audit.trained_tokens = sum(kept["trained"])
    if len(kept) == 0:
        raise UserError(
            f"{source}: no trainable rows remain ({audit.summary()}). Raise data.max_seq_len, set "
            "data.truncation: truncate, or check that rows have assistant turns."
        )
    audit.example = example_pieces(kept[0]["input_ids"], kept[0]["labels"], tokenizer)
    return kept.select_columns(["input_ids", "labels", "length"]), audit


def tokenize_example(example: Example, tokenizer, train_on: str) -> tuple[list[int], list[int]]:
    if example.is_chat:
        return tokenize_chat(example, tokenizer, train_on)
    # Plain text: each segment tokenized on its own, as a prompt is at inference and as TRL does, so
    # no token straddles the prompt/completion boundary. BOS (if the tokenizer adds one) comes first;
    # EOS comes last, trained with the last segment, so the model learns where a sample ends.
    input_ids, labels = [], []
    for number, (text, trained) in enumerate(example.segments):
        ids = tokenizer(text, add_special_tokens=number == 0)["input_ids"]
        input_ids += ids
        labels += ids if trained or train_on == "all" else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
        labels.append(eos if example.segments[-1][1] or train_on == "all" else IGNORE_INDEX)
    if labels:
        labels[0] = IGNORE_INDEX  # nothing precedes the first token: it is never a target
    return input_ids, labels


def tokenize_chat(example: Example, tokenizer, train_on: str) -> tuple[list[int], list[int]]:
    text, spans = chat_spans(example, tokenizer, train_on)
    # The template writes BOS and turn tokens: adding special tokens again would double BOS.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if end > start and any(low <= start < high for low, high in spans) else IGNORE_INDEX
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
    ]
    if labels:
        labels[0] = IGNORE_INDEX
    return encoded["input_ids"], labels


def render_chat(tokenizer, messages: list[dict], **options) -> str:
    """The tokenizer's chat template applied (transformers runs it in Jinja's sandbox).

    A template is code from the model's files: one that fails, raises on purpose, or reaches for
    what the sandbox forbids is a UserError naming the row (tokenize_rows adds it), never a traceback.
    """
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except TemplateError as error:
        raise UserError(
            f"the chat template failed on this row ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "The template comes from the model's tokenizer files (chat_template); fix it there, or set "
            "data.chat_template: chatml."
        ) from None


def chat_spans(example: Example, tokenizer, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return it with the character spans to train."""
    messages = example.messages
    text = render_chat(tokenizer, messages)
    if train_on == "all":
        return text, [(0, len(text))]
    turns = example.trained_turns
    if turns is None:
        turns = [i for i, turn in enumerate(messages) if turn["role"] == "assistant"]
    turns = [i for i in turns if messages[i]["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for index in turns:
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise UserError(
                "the chat template renders earlier turns differently once later turns follow (for example it "
                "drops earlier reasoning), so assistant spans cannot be located. Use data.chat_template: chatml, "
                "or data.train_on: last_assistant if only earlier turns are affected."
            )
        spans.append((len(before), len(through)))
    return text, spans


def example_pieces(input_ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """Consecutive tokens grouped by trained or not, decoded: the audit's example."""
    pieces: list[tuple[list[int], bool]] = []
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != IGNORE_INDEX
        if pieces and pieces[-1][1] == trained:
            pieces[-1][0].append(token)
        else:
            pieces.append(([token], trained))
    return [(tokenizer.decode(tokens), trained) for tokens, trained in pieces]


def print_audit(audit: DataAudit, stream=None) -> None:
    """The audit's example sample, coloured in a terminal (NO_COLOR respected), marked in logs."""
    stream = stream or sys.stdout
    colour = stream.isatty() and not os.environ.get("NO_COLOR")
    legend = "trained tokens in green, masked dimmed" if colour else "trained tokens inside [[ ]], masked outside"
    cached = " (tokenized earlier: read from the cache)" if audit.from_cache else ""
    print(f"Data: {audit.source}, {audit.format}; chat template: {audit.chat_template}{cached}", file=stream)
    print(f"Example sample ({legend}):\n{audit.render_example(colour)}\n", file=stream, flush=True)


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
        batch["scored_positions"] = scored_positions(batch["labels"])
        return batch
