"""Tiny tokenizers and models built here, never downloaded; process-wide state reset per test."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Ahoy! The sea is wide and the ship is fast, matey. Arr!",
    "How many days are in a week? A week has seven days.",
    "system user assistant You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]
REPO = Path(__file__).resolve().parent.parent
# The tiny random models' shape: 2 layers, 4 heads of 16 sharing 2 key/value heads (GQA).
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), **named):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    names = {"eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"} | named
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **{k: v for k, v in names.items() if v})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the tiny tokenizer, saved as bf16 safetensors like a hub model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), build_tokenizer())


def base_tokenizer():
    """Like a base model's: no chat template, no ChatML tokens, EOS = UNK, no pad."""
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>",), eos_token="<|endoftext|>", pad_token=None)
    tokenizer.chat_template = None
    return tokenizer


def save_tiny_llama(folder: Path, tokenizer, tie_word_embeddings: bool = False, **shape) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_SHAPE,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.25,  # a frozen lm_head of std 0.02 caps the logits: loss could hardly fall
    )
    config.update(shape)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def nf4(compute_dtype=torch.float32):
    """The quantization training uses: NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def chat_row(user: str, assistant: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def chat_file(tmp_path) -> Path:
    questions = ["What is the capital of France?", "How many days are in a week?", "Is the sea wide?"]
    rows = [
        chat_row(f"{q} ({i})", "Ahoy! " + "the ship is fast, matey. " * (1 + 3 * (i % 3)) + "Arr!")
        for i, q in enumerate(questions * 8)
    ]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def write_config(path: Path, model_dir: Path, train_file: Path, output_dir: Path, **sections) -> Path:
    import yaml

    config = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(train_file), "max_seq_len": 128},
        "train": {"micro_batch_size": 4, "max_steps": 20, "lr": 1e-2, "warmup_steps": 2},
        "log": {"wandb": {"mode": "disabled"}},
        "output_dir": str(output_dir),
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def reset_process_state(monkeypatch, tmp_path_factory):
    """Accelerate keeps singletons; env vars and the default dtype leak between in-process runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for name in list(os.environ):
        if name.startswith(("ACCELERATE_", "WANDB_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Each test tokenizes afresh unless it reuses this cache on purpose; the model cache stays shared.
    monkeypatch.setenv("QLORA_LOOP_DATA_CACHE", str(tmp_path_factory.mktemp("tokenized")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may wait on the network
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (or read-only), mounted for the test: a real full or read-only disk."""
    mounted = []

    def mount(size_kib: int, read_only: bool = False) -> Path:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        options = f"size={size_kib}k" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
