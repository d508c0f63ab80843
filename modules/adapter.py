"""Loading a trained adapter with its base, for chat.py and merge.py.

Everything a user can get wrong (a folder that is not an adapter, no tokenizer, a base whose layer
shapes differ from the adapter's) is checked from configs and file headers, before weights load.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors import safe_open

from modules.errors import UserError
from modules.model import same_4bit_numerics_on_every_cpu
from modules.sources import resolve_model_source

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    base: str  # something from_pretrained can load
    config: dict  # adapter_config.json
    quant: dict  # the training run's quant section (NF4 + double quant unless the run said otherwise)


def inspect_adapter(folder: Path, base_override: str | None = None) -> AdapterInfo:
    """Check that `folder` is a LoRA adapter with a tokenizer and that its base fits it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a run's adapter folder, e.g. runs/demo/adapter.")
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        hint = (
            " (it holds a full model: load it with transformers directly)" if (folder / "config.json").exists() else ""
        )
        raise UserError(
            f"{folder} is not an adapter folder: {', '.join(missing)} missing{hint}. "
            "Give output_dir/adapter of a run, or a checkpoint's adapter folder."
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(
            f"{folder} has no tokenizer (tokenizer_config.json missing); qlora-loop saves one with every "
            "adapter. Copy the training tokenizer into the folder."
        )
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(
            f"{folder}/adapter_config.json is not valid JSON ({error}); the adapter folder is damaged. Use a "
            "checkpoint's adapter folder, or train again."
        ) from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{folder}/adapter_config.json does not describe a LoRA adapter; give a qlora-loop adapter.")
    base_name = base_override or config.get("base_model_name_or_path")
    if not base_name:
        raise UserError(f"{folder}/adapter_config.json names no base model; pass --base PATH.")
    base = resolve_model_source(base_name)
    try:
        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise UserError(f"base model {base_name!r} could not be read ({error}); pass --base PATH.") from None
    with torch.device("meta"):  # shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(base_config)
    _check_shapes(folder, skeleton, base_name)
    run_config = folder.parent / "config.yaml"  # present when the folder is a run's output_dir/adapter
    quant = yaml.safe_load(run_config.read_text()).get("quant", {}) if run_config.is_file() else {}
    return AdapterInfo(folder=folder, base=base, config=config, quant=quant)


def _check_shapes(folder: Path, skeleton: torch.nn.Module, base_name: str) -> None:
    from safetensors import SafetensorError

    weights_file = folder / "adapter_model.safetensors"
    try:
        with safe_open(weights_file, framework="pt"):
            pass  # the header must cover the whole file: a cut-off file fails to open
    except (SafetensorError, OSError) as error:
        raise UserError(
            f"{weights_file} cannot be read ({error}); the file is damaged or cut short. Use a checkpoint's "
            "adapter folder, or train again."
        ) from None
    modules = dict(skeleton.named_modules())
    with safe_open(weights_file, framework="pt") as weights:
        for key in weights.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            name = key.removeprefix(PEFT_PREFIX).split(".lora_")[0]
            shape = weights.get_slice(key).get_shape()
            layer = modules.get(name)
            if layer is None:
                raise UserError(f"the adapter trains {name}, which base {base_name!r} does not have: wrong base?")
            if not isinstance(layer, torch.nn.Linear):
                continue
            fits = shape[1] == layer.in_features if ".lora_A." in key else shape[0] == layer.out_features
            if not fits:
                raise UserError(
                    f"the adapter does not fit base {base_name!r}: {key} has shape {list(shape)}, but the "
                    f"base's {name} is {layer.in_features} -> {layer.out_features}. Pass the base it was "
                    "trained on with --base."
                )


def compute_dtype_for(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU bf16 is emulated on most CPUs and many times slower


def load_with_adapter(
    info: AdapterInfo, load: Literal["4bit", "bf16", "fp32"], device: torch.device, tokenizer
) -> torch.nn.Module:
    """The base (4-bit NF4 like training, or unquantized) with the adapter applied, for inference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(load, compute_dtype_for(device))
    quantization = None
    if load == "4bit":
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=info.quant.get("quant_type", "nf4"),
            bnb_4bit_use_double_quant=info.quant.get("double_quant", True),
            bnb_4bit_compute_dtype=dtype,
        )
    base = AutoModelForCausalLM.from_pretrained(
        info.base, quantization_config=quantization, dtype=dtype, device_map={"": device}
    )
    same_4bit_numerics_on_every_cpu(base)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))  # the run added chat-template tokens; the adapter holds the rows
    return PeftModel.from_pretrained(base, info.folder).eval()
