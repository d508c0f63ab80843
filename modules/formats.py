"""Row formats: detect which one a dataset uses, and turn each row into an `Example`.

    messages            {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
    sharegpt            {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
    alpaca              {"instruction": ..., "input": ... (optional), "output": ...}
    prompt_completion   {"prompt": ..., "completion": ...}  (strings: plain text; lists: chat turns)
    text                {"text": ...}  (plain text, every token trained)

Chat examples are rendered by the chat template later; plain examples are tokenized as they are.
"""

from dataclasses import dataclass

from modules.errors import UserError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}
# In the order auto detection prefers them when a dataset has the keys of several.
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}


@dataclass(frozen=True)
class Example:
    """One training sample: chat turns (rendered by the template), or plain text segments.

    For chat, `trained_turns` are the indices of the turns whose tokens the format trains by
    default (None: every assistant turn). For plain text, `segments` pairs each piece of text
    with whether it is trained.
    """

    messages: list[dict] | None = None
    trained_turns: tuple[int, ...] | None = None
    segments: tuple[tuple[str, bool], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def detect_format(columns: list[str], asked: str, source: str) -> tuple[str, str]:
    """The format to use and a sentence saying how it was chosen."""
    if asked != "auto":
        missing = [key for key in FORMAT_KEYS[asked] if key not in columns]
        if missing:
            raise UserError(
                f"{source}: data.format is {asked}, which needs the keys {list(FORMAT_KEYS[asked])}, but rows have "
                f"{sorted(columns)}. Set data.format to auto, or to the format these rows are in."
            )
        return asked, f"format {asked} (set in data.format)"
    matches = [name for name, keys in FORMAT_KEYS.items() if all(key in columns for key in keys)]
    if not matches:
        known = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FORMAT_KEYS.items())
        raise UserError(
            f"{source}: cannot tell the row format from the keys {sorted(columns)}. Known formats and their "
            f"keys: {known}. Rename the columns, or set data.format."
        )
    chosen = matches[0]
    others = f"; the keys also fit {', '.join(matches[1:])}: set data.format to choose" if matches[1:] else ""
    return chosen, f"format {chosen} (detected from the keys {list(FORMAT_KEYS[chosen])}{others})"


def is_chat_format(name: str, first_row: dict) -> bool:
    if name == "prompt_completion":
        return isinstance(first_row.get("prompt"), list)
    return name != "text"


def to_example(name: str, row: dict, where: str) -> Example:
    """Convert one row of format `name`; `where` names the file and row in error messages."""
    keys = FORMAT_KEYS[name]
    absent = [key for key in keys if row.get(key) is None]
    if absent:
        found = sorted(key for key, value in row.items() if value is not None)
        raise UserError(f"{where}: format {name} needs {list(keys)}, but {absent} missing; keys found: {found}.")
    if name == "messages":
        return Example(messages=check_messages(row["messages"], where, "role", "content", lambda role: role))
    if name == "sharegpt":
        turns = row["conversations"]
        # Some ShareGPT exports use role/content inside "conversations"; accept both spellings.
        role_content = bool(turns) and isinstance(turns[0], dict) and "role" in turns[0]
        role_key, text_key = ("role", "content") if role_content else ("from", "value")
        return Example(messages=check_messages(turns, where, role_key, text_key, SHAREGPT_ROLES.get))
    if name == "alpaca":
        instruction, extra = _text(row, "instruction", where), row.get("input")
        user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            messages.insert(0, {"role": "system", "content": row["system"]})
        return Example(messages=messages)
    if name == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            messages = check_messages(prompt + completion, where, "role", "content", lambda role: role, partial=True)
            trained = tuple(range(len(prompt), len(messages)))
            if not any(messages[i]["role"] == "assistant" for i in trained):
                raise UserError(f"{where}: the completion has no assistant turn, so nothing would be trained.")
            return Example(messages=messages, trained_turns=trained)
        if not (isinstance(prompt, str) and isinstance(completion, str)):
            raise UserError(
                f"{where}: prompt and completion must both be strings (plain text) or both lists of "
                f"{{role, content}} turns; got {type(prompt).__name__} and {type(completion).__name__}."
            )
        return Example(segments=((prompt, False), (completion, True)))
    return Example(segments=((_text(row, "text", where), True),))


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__}.")
    return value


def check_messages(turns, where: str, role_key: str, text_key: str, role_of, partial: bool = False) -> list[dict]:
    """Validate chat turns and return them as [{role, content}] with standard role names."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: needs a non-empty list of {{{role_key}, {text_key}}} turns.")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise UserError(f"{where}, turn {number}: each turn needs a '{role_key}' and a string '{text_key}'.")
        role = role_of(turn.get(role_key))
        if role not in ROLES:
            allowed = ", ".join(ROLES) if role_key == "role" else ", ".join(SHAREGPT_ROLES)
            raise UserError(f"{where}, turn {number}: unknown role {turn.get(role_key)!r}; allowed: {allowed}.")
        messages.append({"role": role, "content": turn[text_key]})
    if messages[0]["role"] == "assistant":
        raise UserError(f"{where}: the conversation starts with an assistant turn; start with system or user.")
    if not partial and not any(turn["role"] == "assistant" for turn in messages):
        raise UserError(f"{where}: has no assistant turn, so nothing would be trained.")
    return messages
