"""Talk to a fine-tuned adapter, or compare it with its base model.

    python chat.py runs/demo/adapter                                     # interactive, streamed
    python chat.py runs/demo/adapter --prompt "What is the capital of Italy?"
    python chat.py runs/demo/adapter --compare data/demo/compare.jsonl   # base vs tuned, side by side

The base model and the chat template are read from the adapter folder. The base loads in 4-bit
NF4 like in training (--load bf16 for an unquantized base). In a chat, /reset clears the history
and /exit (or Ctrl-D) quits.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from modules.adapter import inspect_adapter, load_with_adapter
from modules.errors import UserError, quiet_progress_off_a_terminal, report_user_error
from modules.generation import GenerationSettings, behaviour_rates, compare_answers, reply
from modules.outputs import write_text_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="adapter folder (a run's output_dir/adapter)")
    parser.add_argument("--base", help="base model, if not the one named in adapter_config.json")
    parser.add_argument("--load", choices=["4bit", "bf16", "fp32"], default="4bit", help="how the base loads")
    parser.add_argument("--prompt", help="answer this once and exit")
    parser.add_argument("--system", help="system prompt for the chat")
    parser.add_argument("--compare", type=Path, metavar="PROMPTS.jsonl", help='rows of {"prompt", "expect"?}')
    parser.add_argument("--out", type=Path, help="where --compare writes (default: beside the adapter)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--greedy", action="store_true", help="no sampling (always so with --compare)")
    return parser.parse_args(argv)


def read_compare_prompts(path: Path) -> list[dict]:
    """Rows of {"prompt": str, "expect": optional regex that the taught behaviour matches}."""
    if not path.is_file():
        raise UserError(f'--compare {path} does not exist; give a JSONL file of {{"prompt": ...}} rows.')
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} line {number}: not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{path} line {number}: needs a string 'prompt'.")
        try:
            re.compile(row.get("expect") or "")
        except re.error as error:
            raise UserError(f"{path} line {number}: 'expect' is not a valid regex ({error}).") from None
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no prompts.")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_progress_off_a_terminal()
    try:
        run(args)
    except UserError as error:
        return report_user_error(error)
    return 0


def run(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, TextStreamer

    info = inspect_adapter(args.adapter, args.base)  # checks everything before weights load
    compare_rows = read_compare_prompts(args.compare) if args.compare else None
    tokenizer = AutoTokenizer.from_pretrained(info.folder)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_with_adapter(info, args.load, device, tokenizer)

    if compare_rows is not None:
        prompts = [row["prompt"] for row in compare_rows]
        print(f"Comparing base and tuned on {len(prompts)} prompt(s), greedy, up to {args.max_new_tokens} tokens each.")

        def show(index: int, side: str, text: str) -> None:
            label = f"[{index + 1}/{len(prompts)}] " if side == "prompt" else f"  {side:<5}: "
            print(label + text, flush=True)

        rows = compare_answers(model, tokenizer, prompts, args.max_new_tokens, on_answer=show)
        rates = behaviour_rates(rows, [row.get("expect") for row in compare_rows])
        out = args.out or info.folder.parent / "compare.jsonl"
        write_text_atomic(out, "".join(json.dumps(row) + "\n" for row in rows))
        print_comparison(rates, out)
        return

    settings = GenerationSettings(args.max_new_tokens, args.greedy, args.temperature, args.top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        reply(model, tokenizer, [*history, {"role": "user", "content": args.prompt}], settings, streamer)
        return
    print(f"Chatting with {info.folder} on {info.base} ({args.load}, {device.type}). /reset, /exit.")
    while True:
        try:
            text = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("bot> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, history, settings, streamer)})


def print_comparison(rates, out: Path) -> None:
    """What follows the answers, which were shown as they came."""
    if rates:
        (base_hits, n), (tuned_hits, _) = rates["base"], rates["tuned"]
        print(
            f"Taught behaviour (answers matching their 'expect'): base {base_hits}/{n} ({base_hits / n:.0%}), "
            f"tuned {tuned_hits}/{n} ({tuned_hits / n:.0%})"
        )
    print(f"Written to {out}")


if __name__ == "__main__":
    sys.exit(main())
