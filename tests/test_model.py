import bitsandbytes as bnb
import pytest
import torch
from conftest import build_tokenizer

from modules.config import RunConfig
from modules.errors import UserError
from modules.model import (
    Precision,
    ensure_distinct_pad,
    inspect_model,
    load_model,
    load_tokenizer,
    resolve_attention,
    resolve_precision,
)

CPU = torch.device("cpu")


def run_config(model_dir="m", **train) -> RunConfig:
    return RunConfig.model_validate(
        {"model": {"name_or_path": str(model_dir)}, "data": {"train": "x.jsonl"}, "train": train, "output_dir": "o"}
    )


def test_pad_equal_to_eos_is_replaced_by_an_unused_special_token():
    tokenizer = build_tokenizer()  # pad = eos = <|im_end|>, unk = <|endoftext|>
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_a_pad_named_special_token_is_preferred():
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|finetune_pad|>"))
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|finetune_pad|>"


def test_a_new_pad_token_is_added_when_nothing_else_fits():
    tokenizer = build_tokenizer(special_tokens=("<|im_start|>", "<|im_end|>"), unk_token=None)
    before = len(tokenizer)
    ensure_distinct_pad(tokenizer)
    assert tokenizer.pad_token == "<|pad|>" and len(tokenizer) == before + 1


def test_precision_on_the_cpu_is_fp32_unless_asked():
    assert resolve_precision(run_config(), CPU) == Precision("no", torch.float32)
    assert resolve_precision(run_config(mixed_precision="bf16"), CPU) == Precision("bf16", torch.bfloat16)


def test_launcher_and_run_config_must_agree_on_precision(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert resolve_precision(run_config(), CPU).mixed == "fp16"  # auto follows the launcher
    with pytest.raises(UserError, match="launcher asks for mixed_precision fp16 but train.mixed_precision is bf16"):
        resolve_precision(run_config(mixed_precision="bf16"), CPU)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # a launcher saying "no" defers to the run config
    assert resolve_precision(run_config(mixed_precision="bf16"), CPU).mixed == "bf16"


def test_attention_auto_is_sdpa_without_flash_attn_and_an_impossible_choice_is_refused():
    fp32 = Precision("no", torch.float32)
    assert resolve_attention(run_config(), CPU, fp32) == "sdpa"
    config = run_config()
    config.model.attn_implementation = "flash_attention_2"
    with pytest.raises(UserError, match="flash_attention_2, but it cannot run here"):
        resolve_attention(config, CPU, fp32)
    config.model.attn_implementation = "eager"
    assert resolve_attention(config, CPU, fp32) == "eager"


def test_inspect_model_refuses_targets_the_architecture_lacks(tiny_model_dir):
    config = run_config(tiny_model_dir)
    summary = inspect_model(config, str(tiny_model_dir))
    assert summary.quantized_linears == 2 * 7 and summary.lora_params > 0
    config.lora.target_modules = ["q_proj", "query_key_value"]
    with pytest.raises(UserError, match=r"\['query_key_value'\] are not linear layers.*'gate_proj'"):
        inspect_model(config, str(tiny_model_dir))


def test_a_folder_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(UserError, match="could not load a tokenizer"):
        load_tokenizer(str(tmp_path / "nothing-here"))


def test_base_linears_are_nf4_with_double_quantization_and_only_lora_trains(tiny_model_dir):
    config = run_config(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, Precision("no", torch.float32), "sdpa", CPU)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    quant_state = q_proj.base_layer.weight.quant_state
    assert quant_state.quant_type == "nf4" and quant_state.nested  # double quantization
    assert quant_state.state2 is not None  # the absmax constants are themselves quantized
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 14
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if p.requires_grad)
    assert model.base_model.model.is_gradient_checkpointing


def test_unquantized_weights_stay_in_the_compute_dtype_and_lora_in_fp32(tiny_model_dir):
    config = run_config(tiny_model_dir, grad_checkpointing=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, Precision("bf16", torch.bfloat16), "sdpa", CPU)
    inner = model.base_model.model
    assert inner.model.embed_tokens.weight.dtype == torch.bfloat16  # no fp32 upcast of embeddings
    assert inner.lm_head.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert not inner.is_gradient_checkpointing


def test_plain_lora_twin_loads_without_quantization(tiny_model_dir):
    config = run_config(tiny_model_dir)
    config.quant.load_in_4bit = False
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, Precision("no", torch.float32), "sdpa", CPU)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
