"""GGUF export: a merged model as one file that llama.cpp, Ollama and LM Studio run.

The weights go under llama.cpp's tensor names (gguf's own name map), the q/k rows of the llama
architecture in the order llama.cpp's rotary embedding reads them, and the tokenizer (vocabulary,
merges, token kinds, special tokens, chat template) as the file's metadata. Tensors are converted
and written one at a time, so the export needs the merged model's memory plus one tensor. The
written tokenizer is read back with transformers' own GGUF reader and must encode a rendered chat
exactly as the training tokenizer does, or the file is not kept.
"""

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from modules.errors import UserError
from modules.outputs import room_to_write, write_file_atomic, write_text_atomic

# transformers model_type -> GGUF architecture. llama.cpp runs Mistral as llama, and so do we.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
SUPPORTED_WORDS = "llama (Llama 2 and 3, SmolLM2), mistral, qwen2"

Q = gguf.GGMLQuantizationType
FILE_TYPES = {  # --gguf-type: what 2-D weights become (norms and biases stay F32, as llama.cpp keeps them)
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# Byte-level BPE pre-tokenizers by llama.cpp's name: the regex that splits text before the merges.
KNOWN_SPLITS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class Shape:
    """What the GGUF header needs of a causal LM's config."""

    architecture: str  # GGUF's
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    context: int
    rms_eps: float
    rope_theta: float


def check_exportable(config) -> Shape:
    """The model's shape for GGUF, or a UserError saying why it cannot be exported (before weights load)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"--gguf: a {model_type} model cannot be exported to GGUF here; supported: {SUPPORTED_WORDS}.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(
            f"--gguf: the model scales its rotary embedding ({rope_type}), which this export does not write yet; "
            "export the merged safetensors model instead (merge.py ADAPTER OUT) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    heads = config.num_attention_heads
    return Shape(
        architecture=ARCHITECTURES[model_type],
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        context=config.max_position_embeddings,
        rms_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
    )


def check_gguf_path(path: Path, overwrite: bool) -> None:
    """Refuse an export whose files (the GGUF and its Ollama Modelfile) exist, unless overwrite is asked."""
    if path.is_dir():
        raise UserError(f"--gguf {path} is a folder; give a file name, e.g. {path / 'model.gguf'}.")
    existing = [str(p) for p in (path, modelfile_path(path)) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{' and '.join(existing)} already exist(s); add --overwrite to replace, or give another path.")


def modelfile_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.Modelfile")


def export_gguf(model, tokenizer, path: Path, file_type: str, name: str) -> None:
    """Write `model` (a merged transformers causal LM) and `tokenizer` as one GGUF file, then its Modelfile."""
    shape = check_exportable(model.config)
    window = getattr(model.config, "sliding_window", None)
    if window and (model.config.model_type == "mistral" or getattr(model.config, "use_sliding_window", False)):
        print(
            f"qlora-loop: warning: the model attends within a sliding window of {window:,} tokens, which GGUF's "
            f"{shape.architecture} architecture does not carry: llama.cpp attends to the whole context, so on "
            f"prompts longer than {window:,} tokens its replies can differ from transformers'.",
            file=sys.stderr,
            flush=True,
        )
    tensors = gguf_tensors(model, shape)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows.")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(staging: Path) -> None:
        writer = gguf.GGUFWriter(staging, shape.architecture)
        add_shape(writer, shape, rows, name, FILE_TYPES[file_type][1])
        add_tokenizer(writer, tokenizer, rows)
        write_tensors(writer, tensors, FILE_TYPES[file_type][0])
        check_tokenizer_reads_back(staging, tokenizer)

    with room_to_write("the GGUF file", path.parent):
        write_file_atomic(path, write)
        text = ollama_modelfile(path, tokenizer, getattr(model.generation_config, "eos_token_id", None))
        write_text_atomic(modelfile_path(path), text)


def add_shape(writer, shape: Shape, vocab_rows: int, name: str, file_type) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_theta)
    if shape.architecture == "llama":
        writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(vocab_rows)
    writer.add_file_type(file_type)


def gguf_tensors(model, shape: Shape) -> list[tuple[str, torch.Tensor, int | None]]:
    """(GGUF name, tensor, heads) for every weight, where `heads` says the rows are to be put in
    llama.cpp's rotary order (q/k of the llama architecture) as the tensor is written.

    lm_head is written even when tied to the embedding, so every reader gets an output layer.
    """
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[shape.architecture.upper()], shape.layers)
    state = model.state_dict()
    state.setdefault("lm_head.weight", model.get_input_embeddings().weight)
    tensors = []
    for key, tensor in state.items():
        if "rotary_emb" in key:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"--gguf: the model has a weight GGUF has no name for ({key}); it cannot be exported.")
        heads = None
        if shape.architecture == "llama" and ".self_attn.q_proj." in key:
            heads = shape.heads
        elif shape.architecture == "llama" and ".self_attn.k_proj." in key:
            heads = shape.kv_heads
        tensors.append((name, tensor, heads))
    return tensors


def rotary_row_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from transformers' rotate-half order (first half, second half) to llama.cpp's
    interleaved pairs; transformers' GGUF reader undoes exactly this."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def storage_type(shape: tuple[int, ...], wanted):
    """What a tensor is stored as: 1-D ones in F32; Q8_0 only for rows of whole 32-value blocks (else F16)."""
    if len(shape) == 1:
        return Q.F32
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return wanted


def encode(tensor: torch.Tensor, heads: int | None, qtype) -> np.ndarray:
    if heads is not None:
        tensor = rotary_row_order(tensor, heads)
    return gguf.quants.quantize(tensor.detach().float().cpu().numpy(), qtype)


def write_tensors(writer, tensors: list[tuple[str, torch.Tensor, int | None]], wanted) -> None:
    """The header with every tensor's name, shape and type first, then the data one tensor at a time."""
    for name, tensor, _ in tensors:
        shape = tuple(tensor.shape)
        qtype = storage_type(shape, wanted)
        if qtype in (Q.F32, Q.F16):
            dtype = np.float32 if qtype == Q.F32 else np.float16
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor, heads in tensors:
        writer.write_tensor_data(encode(tensor, heads, storage_type(tuple(tensor.shape), wanted)))
    writer.close()


def add_tokenizer(writer, tokenizer, vocab_rows: int) -> None:
    """The tokenizer as llama.cpp's metadata: "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen2) or
    "llama" (sentencepiece-style BPE with byte fallback: Mistral, Llama 2)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = backend["model"]
    decoder = json.dumps(backend.get("decoder"), ensure_ascii=False)
    byte_level = '"ByteLevel"' in decoder
    sentencepiece = not byte_level and bpe.get("byte_fallback") and "\u2581" in decoder
    if bpe.get("type") != "BPE" or not (byte_level or sentencepiece):
        raise UserError(
            f"--gguf: the tokenizer is a {bpe.get('type')} model this export cannot describe; supported: byte-level "
            "BPE (SmolLM2, Llama 3, Qwen2) and sentencepiece-style BPE with byte fallback (Mistral, Llama 2)."
        )
    added = tokenizer.added_tokens_decoder
    tokens, kinds = [], []
    for index in range(vocab_rows):
        token = tokenizer.convert_ids_to_tokens(index) if index < len(tokenizer) else None
        if token is None:
            tokens.append(f"[PAD{index}]")  # embedding rows beyond the vocabulary, as llama.cpp names them
            kinds.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            kinds.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif sentencepiece and token == tokenizer.unk_token:
            tokens.append(token)
            kinds.append(gguf.TokenType.UNKNOWN)
        elif sentencepiece and BYTE_TOKEN.fullmatch(token):
            tokens.append(token)
            kinds.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            kinds.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2" if byte_level else "llama")
    if byte_level:
        writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    else:
        # llama.cpp merges sentencepiece pieces by score; the vocabulary is ordered best merge first.
        writer.add_token_scores([0.0 if kind != gguf.TokenType.NORMAL else -float(i) for i, kind in enumerate(kinds)])
        writer.add_add_space_prefix(adds_space_prefix(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in bpe["merges"]])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for how a byte-level tokenizer splits text before its merges."""
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [part for part in parts if part.get("type") == "Split"]
    if len(splits) == 1 and parts[-1].get("type") == "ByteLevel" and not parts[-1].get("use_regex", True):
        regex = splits[0].get("pattern", {}).get("Regex")
        for name, known in KNOWN_SPLITS.items():
            if regex == known:
                return name
    raise UserError(
        f"--gguf: the tokenizer splits text in a way this export cannot name for llama.cpp ({json.dumps(pre)[:200]}); "
        "known: GPT-2's, Llama 3's and Qwen2's."
    )


def adds_space_prefix(backend: dict) -> bool:
    """Whether a sentencepiece-style tokenizer puts a "\u2581" before the text (a Metaspace or Prepend step)."""
    steps = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")])
    return '"Prepend"' in steps or ('"Metaspace"' in steps and '"prepend_scheme": "never"' not in steps)


def check_tokenizer_reads_back(path: Path, tokenizer) -> None:
    """transformers' GGUF reader must rebuild a tokenizer that encodes a rendered chat as training did."""
    from transformers import AutoTokenizer

    read = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    question = "Hello! What is 12,345 + 678? Answer in 2 words.\n\nThanks \u00e9\u00e8 \u2014 \u4f60\u597d"
    conversation = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "  Twelve thousand...\tdone."},
    ]
    texts = [conversation[0]["content"] + conversation[1]["content"]]
    if isinstance(tokenizer.chat_template, str):
        try:
            texts.append(tokenizer.apply_chat_template(conversation, tokenize=False))
        except Exception:  # a template with rules of its own (a system turn first, ...): the plain text still counts
            pass
    for text in texts:
        if read(text)["input_ids"] != tokenizer(text)["input_ids"]:
            raise UserError(
                "--gguf: the tokenizer written to the GGUF file, read back by transformers, splits this text "
                f"differently from the training tokenizer, so the file was not kept: {text[:120]!r}"
            )


def default_system_prompt(tokenizer) -> str | None:
    """The system turn a ChatML template writes by itself when a chat has none (SmolLM2's does)."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
    except Exception:  # a template with rules of its own: Ollama then reads the GGUF's template
        return None
    found = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.DOTALL)
    return found.group(1) if found else None


def ollama_modelfile(path: Path, tokenizer, eos_ids) -> str:
    """An Ollama Modelfile beside the GGUF: FROM the file, and the tokens that end a reply.

    ChatML (the template qlora-loop gives a base model) is spelled out in Ollama's template
    language; any other template Ollama reads from the GGUF's tokenizer.chat_template itself.
    """
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.insert(0, tokenizer.eos_token_id)
    stops = list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in eos_ids))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    if "<|im_start|>" in template:
        stops = list(dict.fromkeys([*stops, "<|im_end|>"]))
    lines = [f"# ollama create NAME -f {modelfile_path(path).name}", f"FROM ./{path.name}"]
    if "<|im_start|>" in template:
        system = default_system_prompt(tokenizer)
        if system:  # the template writes one when a chat has none, so training saw it: Ollama must too
            lines.append(f'SYSTEM """{system}"""')
        lines.append(
            'TEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
            "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
            '<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"""'
        )
    lines += [f'PARAMETER stop "{stop}"' for stop in stops if stop]
    return "\n".join(lines) + "\n"
