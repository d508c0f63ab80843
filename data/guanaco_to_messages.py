"""Rewrite openassistant-guanaco ("### Human: ... ### Assistant: ...") as chat rows for the seed recipe.

    python data/guanaco_to_messages.py timdettmers/openassistant-guanaco data/guanaco-chat.jsonl
    python data/guanaco_to_messages.py guanaco-train.jsonl data/guanaco-chat.jsonl   # a local copy

Each `text` becomes {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}; the model's
chat template (ChatML for a base model such as Mistral-7B-v0.3) renders it at training time. Rows
that do not alternate Human/Assistant starting with Human are skipped and counted.
"""

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.data import read_rows  # noqa: E402
from modules.errors import UserError, report_user_error  # noqa: E402
from modules.outputs import write_text_atomic  # noqa: E402

TURN = re.compile(r"###\s*(Human|Assistant):")
ROLE = {"Human": "user", "Assistant": "assistant"}


def to_messages(text: str) -> list[dict] | None:
    """The turns of one guanaco text, or None when they do not alternate user/assistant from the user."""
    parts = TURN.split(text)
    if parts[0].strip():
        return None
    messages = [
        {"role": ROLE[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)
    ]
    expected = ["user", "assistant"] * (len(messages) // 2)
    if not messages or [m["role"] for m in messages] != expected or not all(m["content"] for m in messages):
        return None
    return messages


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    source, out = argv[0], Path(argv[1])
    try:
        if out.exists():
            raise UserError(f"{out} already exists; give a new file name (nothing was written).")
        rows, _, _ = read_rows(source)
        if "text" not in rows.column_names:
            raise UserError(f"{source}: expected guanaco rows with a 'text' key; keys found: {rows.column_names}.")
        converted = [to_messages(text) for text in rows["text"]]
    except UserError as error:
        return report_user_error(error)
    kept = [{"messages": messages} for messages in converted if messages]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    print(f"{len(kept)} conversations written to {out}; {len(converted) - len(kept)} rows skipped (turns out of order)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
