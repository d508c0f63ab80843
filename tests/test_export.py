"""GGUF export, checked by a reader no one here wrote: transformers' own GGUF loader.

Each architecture the export supports is written from a tiny random model with the kind of
tokenizer its family uses, read back with `from_pretrained(..., gguf_file=...)`, and compared:
logits, and the tokens of a rendered chat.
"""

import copy

import gguf
import pytest
import torch
from conftest import CHATML, CORPUS, TINY_SHAPE, build_tokenizer

from modules.errors import UserError
from modules.export import check_exportable, check_gguf_path, export_gguf

CHAT = [
    {"role": "user", "content": "What is the capital of France? 12345 你好"},
    {"role": "assistant", "content": "Ahoy! Paris, matey.\nArr!"},
]


def qwen2_tokenizer():
    """Byte-level BPE that splits text with Qwen2's regex (single digits), as Qwen2's tokenizer.json does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modules.export import KNOWN_SPLITS

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(KNOWN_SPLITS["qwen2"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def sentencepiece_tokenizer():
    """Mistral's and Llama 2's kind: BPE over "\u2581"-prefixed pieces with <0x..> byte fallback and BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    learner.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=300))
    learned = learner.get_vocab()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{byte:02X}>": 3 + byte for byte in range(256)}
    for token, _ in sorted(learned.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge.split(" ")) for merge in _merges(learner)]
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=True
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _merges(learner) -> list[str]:
    import json

    merges = json.loads(learner.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def tiny(model_type: str, tokenizer, **shape):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer) + 6,  # rows beyond the vocabulary, as padded vocabularies have
        **TINY_SHAPE | shape,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2) if parameter.ndim > 1 else parameter.uniform_(0.5, 1.5)
            parameter.data = parameter.data.to(torch.bfloat16)  # as merge.py merges by default (buffers stay fp32)
    return model


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, :, :].float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    ("model_type", "make_tokenizer", "shape"),
    [
        ("llama", build_tokenizer, {}),
        ("qwen2", qwen2_tokenizer, {"tie_word_embeddings": True}),
        ("mistral", sentencepiece_tokenizer, {}),
    ],
    ids=["llama-bytelevel", "qwen2-biases-tied", "mistral-sentencepiece"],
)
def test_each_supported_architecture_reads_back_with_the_same_logits_and_tokens(
    tmp_path, model_type, make_tokenizer, shape, capsys
):
    tokenizer = make_tokenizer()
    model = tiny(model_type, tokenizer, **shape)
    path = tmp_path / "model.gguf"
    export_gguf(model, tokenizer, path, "f16", name="tiny")  # bf16 weights in f16: equal but for the tiniest
    # MistralConfig's default sliding window (4,096) has no place in GGUF: the export says so.
    assert ("sliding window of 4,096 tokens" in capsys.readouterr().err) == (model_type == "mistral")
    read, read_tokenizer = read_back(path)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    ids = tokenizer(text)["input_ids"]
    assert read_tokenizer(text)["input_ids"] == ids  # the chat is encoded as training encoded it
    assert read_tokenizer.decode(ids) == tokenizer.decode(ids)
    if model_type == "mistral":  # BOS added, and characters outside the vocabulary spelled as <0x..> bytes
        assert ids[0] == tokenizer.bos_token_id and any(3 <= i < 3 + 256 for i in ids)
    expected = logits(copy.deepcopy(model).float(), ids)
    assert relative_error(logits(read, ids), expected) < 1e-3
    assert read.config.vocab_size == model.config.vocab_size


def test_chatml_tokens_a_run_added_to_a_base_tokenizer_stay_whole_and_end_a_turn(tmp_path):
    from conftest import base_tokenizer

    from modules.data import CHATML_TOKENS, prepare_chat_template

    tokenizer = base_tokenizer()
    assert prepare_chat_template(tokenizer, "auto", chat=True)[1]  # ChatML added, as a run on a base model does
    model = tiny("llama", tokenizer)  # rows for the two new tokens, as the trained adapter carries them
    path = tmp_path / "model.gguf"
    export_gguf(model, tokenizer, path, "bf16", name="tiny")
    _, read_tokenizer = read_back(path)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert read_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    for token in CHATML_TOKENS:
        assert read_tokenizer.convert_tokens_to_ids(token) == tokenizer.convert_tokens_to_ids(token)
    assert read_tokenizer.eos_token == "<|im_end|>" and read_tokenizer.chat_template == tokenizer.chat_template
    modelfile = (tmp_path / "model.Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile  # this template writes none


def test_bf16_is_exact_and_q8_0_is_the_q8_0_rounding_of_every_matrix(tmp_path):
    tokenizer = build_tokenizer()
    model = tiny("llama", tokenizer)
    ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False))["input_ids"]
    expected = logits(copy.deepcopy(model).float(), ids)
    export_gguf(model, tokenizer, tmp_path / "bf16.gguf", "bf16", name="tiny")
    assert torch.equal(logits(read_back(tmp_path / "bf16.gguf")[0], ids), expected)  # bf16 weights, unchanged

    export_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0", name="tiny")
    stored = {tensor.name: tensor.tensor_type for tensor in gguf.GGUFReader(tmp_path / "q8.gguf").tensors}
    assert stored["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert stored["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # vectors stay exact
    # Q8_0 stores each block of 32 weights as int8 times one fp16 scale: the model read back must
    # be exactly the model whose matrices went through that rounding, and nothing else.
    rounded = copy.deepcopy(model).float()
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.ndim == 2:
                packed = gguf.quants.quantize(parameter.numpy(), gguf.GGMLQuantizationType.Q8_0)
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)))
    q8_logits = logits(read_back(tmp_path / "q8.gguf")[0], ids)
    assert relative_error(q8_logits, logits(rounded, ids)) < 1e-5
    assert 0 < relative_error(q8_logits, expected) < 0.25  # what the rounding costs this random model


def test_what_cannot_be_exported_is_refused_before_anything_is_written(tmp_path):
    from transformers import AutoConfig

    with pytest.raises(UserError, match="supported: llama"):
        check_exportable(AutoConfig.for_model("gpt2"))
    scaled = AutoConfig.for_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UserError, match="rotary"):
        check_exportable(scaled)
    (tmp_path / "model.gguf").write_text("someone's file")
    with pytest.raises(UserError, match="--overwrite"):
        check_gguf_path(tmp_path / "model.gguf", overwrite=False)
    assert (tmp_path / "model.gguf").read_text() == "someone's file"
    with pytest.raises(UserError, match="folder"):
        check_gguf_path(tmp_path, overwrite=True)
    (tmp_path / "other.Modelfile").write_text("FROM elsewhere")  # the Modelfile an export would write
    with pytest.raises(UserError, match="other.Modelfile"):
        check_gguf_path(tmp_path / "other.gguf", overwrite=False)


def test_a_full_disk_ends_in_a_clear_message_and_leaves_nothing_behind(small_disk):
    disk = small_disk(64)  # KiB: a quarter of the tiny model's file
    tokenizer = build_tokenizer()
    with pytest.raises(UserError, match="could not write the GGUF file .*No space left on device.*run it again"):
        export_gguf(tiny("llama", tokenizer), tokenizer, disk / "model.gguf", "f16", name="tiny")
    assert list(disk.iterdir()) == []


def test_a_tokenizer_the_reader_would_rebuild_differently_leaves_no_file(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = build_tokenizer()
    # Digits split one by one before the byte-level step (SmolLM's hub tokenizer does this): llama.cpp
    # has a name for it, but transformers' GGUF reader would not rebuild it, so it is refused by name.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(UserError, match="splits text"):
        export_gguf(tiny("llama", tokenizer), tokenizer, tmp_path / "model.gguf", "f16", name="tiny")
    assert list(tmp_path.iterdir()) == []
