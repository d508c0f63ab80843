"""Merge a trained adapter into its base model and save a plain transformers model, a GGUF file, or both.

    python merge.py runs/demo/adapter runs/demo/merged [--base PATH] [--dtype bf16|fp16|fp32]
    python merge.py runs/demo/adapter --gguf runs/demo/model.gguf [--gguf-type bf16|f16|q8_0] [--overwrite]

The base loads unquantized (bf16 by default), never in 4-bit: merging into 4-bit weights would
round the update away (peft#2321). The folder gets safetensors shards, config, generation config
and tokenizer with chat template, loadable with AutoModelForCausalLM and no peft. The GGUF file
(llama.cpp, Ollama, LM Studio) carries the weights, the tokenizer and the chat template, and an
Ollama Modelfile goes beside it. Note that training saw the NF4-rounded base; the merged model adds
the update to the exact base instead.
"""

import argparse
import sys
from pathlib import Path

import torch

from modules.adapter import inspect_adapter, load_with_adapter
from modules.errors import UserError, quiet_progress_off_a_terminal, report_user_error
from modules.export import FILE_TYPES, check_exportable, check_gguf_path, export_gguf, modelfile_path
from modules.outputs import room_to_write, write_dir_atomic

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="adapter folder (a run's output_dir/adapter)")
    parser.add_argument("out", type=Path, nargs="?", help="folder for the merged model (must not exist yet)")
    parser.add_argument("--base", help="base model, if not the one named in adapter_config.json")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="dtype of the merged weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--gguf", type=Path, metavar="FILE", help="also (or only) write the merged model as GGUF")
    parser.add_argument(
        "--gguf-type", choices=list(FILE_TYPES), default="bf16", help="what the GGUF's weight matrices are stored as"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file and its Modelfile")
    args = parser.parse_args(argv)
    if args.out is None and args.gguf is None:
        parser.error("give a folder for the merged model, --gguf FILE, or both")
    return args


def merge(args: argparse.Namespace) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UserError(f"{args.out} already exists and is not empty; give a new folder for the merged model.")
    if args.gguf is not None:
        check_gguf_path(args.gguf, args.overwrite)
    info = inspect_adapter(args.adapter, args.base)
    if args.gguf is not None:
        check_exportable(AutoConfig.from_pretrained(info.base))
    tokenizer = AutoTokenizer.from_pretrained(info.folder)
    load = "fp32" if args.dtype == "fp32" else "bf16"
    model = load_with_adapter(info, load, torch.device("cpu"), tokenizer)  # merging needs no GPU
    merged = model.merge_and_unload().to(DTYPES[args.dtype])
    merged.config.pad_token_id = tokenizer.pad_token_id
    # The tokenizer's EOS ends a turn (<|im_end|> when training gave a base model ChatML): generate() stops there.
    stops = merged.generation_config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        merged.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops]

    def write(folder: Path) -> None:
        merged.save_pretrained(folder, safe_serialization=True, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(folder)

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with room_to_write("the merged model", args.out.parent):
            write_dir_atomic(args.out, write)
        print(f"Merged {info.folder} into {info.base} ({args.dtype}); saved to {args.out}")
    if args.gguf is not None:
        export_gguf(merged, tokenizer, args.gguf, args.gguf_type, name=info.folder.parent.name or info.folder.name)
        print(
            f"Merged {info.folder} into {info.base}; GGUF ({args.gguf_type}) saved to {args.gguf}, Ollama Modelfile "
            f"to {modelfile_path(args.gguf)}. Run it: llama-cli -m {args.gguf} -cnv, or "
            f"ollama create NAME -f {modelfile_path(args.gguf)} && ollama run NAME"
        )
    return args.gguf if args.out is None else args.out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_progress_off_a_terminal()
    try:
        merge(args)
    except UserError as error:
        return report_user_error(error)
    return 0


if __name__ == "__main__":
    sys.exit(main())
