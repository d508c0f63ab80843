import contextlib
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from conftest import build_tokenizer, save_tiny_llama
from pydantic import ValidationError

from modules.config import RunConfig
from modules.errors import UserError
from modules.hardware import Precision, resolve_attention, resolve_precision
from modules.model import inspect_model, load_model, load_tokenizer, resolve_compile
from modules.recompute import is_checkpointing
from modules.tokens import choose_pad_token

CPU = torch.device("cpu")


def run_config(model_dir="m", **train) -> RunConfig:
    return RunConfig.model_validate(
        {"model": {"name_or_path": str(model_dir)}, "data": {"train": "x.jsonl"}, "train": train, "output_dir": "o"}
    )


def test_pad_equal_to_eos_is_replaced_by_an_unused_special_token():
    tokenizer = build_tokenizer()  # pad = eos = <|im_end|>, unk = <|endoftext|>
    choose_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_a_pad_named_special_token_is_preferred():
    tokenizer = build_tokenizer(special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|finetune_pad|>"))
    choose_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|finetune_pad|>"


def test_padding_never_grows_the_vocabulary_eos_pads_when_nothing_else_fits():
    tokenizer = build_tokenizer(special_tokens=("<|im_start|>", "<|im_end|>"), unk_token=None, pad_token=None)
    before = len(tokenizer)
    choose_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == before


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
    assert is_checkpointing(model.base_model.model)


def test_unquantized_weights_stay_in_the_compute_dtype_and_lora_in_fp32(tiny_model_dir):
    config = run_config(tiny_model_dir, grad_checkpointing=False)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, Precision("bf16", torch.bfloat16), "sdpa", CPU)
    inner = model.base_model.model
    assert inner.model.embed_tokens.weight.dtype == torch.bfloat16  # no fp32 upcast of embeddings
    assert inner.lm_head.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert inner.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert not is_checkpointing(inner)


def test_plain_lora_twin_loads_without_quantization(tiny_model_dir):
    config = run_config(tiny_model_dir)
    config.quant.load_in_4bit = False
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, Precision("no", torch.float32), "sdpa", CPU)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer) is torch.nn.Linear
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_compile_and_offload_switches_take_true_false_or_their_word():
    assert run_config(grad_checkpointing="offload", compile="auto").train.grad_checkpointing == "offload"
    assert run_config().train.grad_checkpointing == "auto"
    for key, words in (("grad_checkpointing", "true, false, auto or offload"), ("compile", "true, false or auto")):
        with pytest.raises(ValidationError, match=words):
            run_config(**{key: "sometimes"})


def test_compile_is_on_by_default_on_gpus_except_under_device_map():
    cuda = torch.device("cuda")  # a device object; nothing runs on it
    assert resolve_compile(run_config(), cuda)  # one process, DDP and FSDP alike
    assert not resolve_compile(run_config(), CPU)  # compiling on the CPU costs minutes
    split = RunConfig.model_validate(run_config().model_dump() | {"model": {"name_or_path": "m", "device_map": "auto"}})
    assert not resolve_compile(split, cuda)
    assert resolve_compile(run_config(compile=True), CPU)
    assert not resolve_compile(run_config(compile=False), cuda)


def lora_model(model_dir, compiled: bool = False, dropout: float = 0.0, device=CPU, **train):
    """The tiny 4-bit model with LoRA (no dropout unless asked) and random LoRA B, identical for every call:
    fp32 on the CPU, bf16 on a GPU."""
    config = RunConfig.model_validate(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": "x.jsonl"},
            "lora": {"dropout": dropout},
            "train": train,
            "output_dir": "o",
        }
    )
    tokenizer = load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    precision = Precision("no", torch.float32) if device.type == "cpu" else Precision("bf16", torch.bfloat16)
    model = load_model(config, str(model_dir), tokenizer, precision, "sdpa", device, compiled=compiled)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A without gradient
            torch.nn.init.normal_(parameter, std=0.05)
    model.train()
    return model, tokenizer


def packed_batches(lengths_per_batch: list[list[int]]) -> list[dict]:
    from modules.packing import PackedCollator

    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in lengths_per_batch:
        samples = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in lengths]
        batches.append(PackedCollator()([[{"input_ids": ids, "labels": ids} for ids in samples]]))
    return batches


def run_loss(model, batch: dict) -> torch.Tensor:
    """The training loss as a run computes it (chunked), as the batch's mean over its label tokens."""
    from modules.loss import CausalLMLoss, compute_loss
    from modules.tokens import count_label_tokens

    return compute_loss(CausalLMLoss(model, chunked=True), batch, count_label_tokens(batch["labels"]))


def loss_and_gradients(model, batch: dict, context=None):
    device = next(model.parameters()).device
    batch = {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast, context or contextlib.nullcontext():
        loss = run_loss(model, batch)
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), gradients


@pytest.mark.slow
def test_compiled_decoder_layers_train_like_eager_ones_and_generation_stays_eager(tiny_model_dir):
    from torch._dynamo.utils import counters

    from modules.generation import GenerationSettings, reply
    from modules.recompute import ActivationOffload

    torch._dynamo.reset()
    counters.clear()
    eager, tokenizer = lora_model(tiny_model_dir, compiled=False)
    compiled, _ = lora_model(tiny_model_dir, compiled=True)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # so the saved adapter's keys are unchanged
    for batch in packed_batches([[40, 25], [70, 9, 30]]):  # two token counts: the second is a new shape
        loss, gradients = loss_and_gradients(eager, batch)
        compiled_loss, compiled_gradients = loss_and_gradients(compiled, batch)
        assert compiled_loss == pytest.approx(loss, rel=1e-5)
        assert gradients.keys() == compiled_gradients.keys() and len(gradients) == 28
        for name, gradient in gradients.items():
            torch.testing.assert_close(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the layers did run compiled, not silently eager

    # A compiled layer saves its weights for backward too (the 4-bit bytes: 2,048+ elements here);
    # offloading moves the activations (tokens in their shape) and leaves every weight in place.
    # (The 5,056-byte CPU generator state the compiler keeps per layer around CPU attention, an op
    # that may draw random numbers, stays below the size offloaded here.)
    (batch,) = packed_batches([[60, 36]])
    _, kept = loss_and_gradients(compiled, batch)
    offload = ActivationOffload(compiled, min_elements=6000)
    _, offloaded = loss_and_gradients(compiled, batch, offload)
    assert offload.offloaded and all({94, 95, 96} & set(shape) for shape in offload.offloaded)
    for name, gradient in kept.items():
        assert torch.equal(offloaded[name], gradient)

    compiled.eval()
    settings = GenerationSettings(max_new_tokens=4, greedy=True)
    answer = reply(compiled, tokenizer, [{"role": "user", "content": "Is the sea wide?"}], settings)
    assert isinstance(answer, str)
    assert counters["stats"]["unique_graphs"] == graphs  # generating compiled nothing new


def compiled_against_eager_with_seeded_dropout(
    model_dir, device, tolerance: float, dropout: float = 0.1, recompute_inputs: bool = False
) -> None:
    """Compiled layers under the activation memory budget, LoRA dropout by seeded masks, train like eager
    layers with the same masks: what the compiler recomputes in backward (the masks too, and with
    `recompute_inputs` the dropped inputs) is what the forward computed. `tolerance` bounds each
    gradient's difference relative to its norm (bf16 kernels round differently)."""
    from modules.dropout import recompute_dropped_inputs, seeded_dropouts, use_seeded_dropout

    compiled, _ = lora_model(model_dir, compiled=True, dropout=dropout, device=device, grad_checkpointing=False)
    recompute_dropped_inputs(compiled, recompute_inputs)
    eager, _ = lora_model(model_dir, compiled=False, dropout=dropout, device=device, grad_checkpointing=False)
    assert not seeded_dropouts(eager)  # eager layers keep PEFT's dropout
    assert use_seeded_dropout(eager) == (14 if dropout else 0)  # 7 projections x 2 layers
    assert len(seeded_dropouts(compiled)) == (8 if dropout else 0)  # shared per input: q/k/v, o, gate/up, down
    trained = {name: value for name, value in compiled.state_dict().items() if "lora_" in name}
    eager.load_state_dict(trained, strict=False)
    for ours, theirs in zip(seeded_dropouts(eager), seeded_dropouts(compiled), strict=True):
        ours.base_seed.copy_(theirs.base_seed)

    def largest_difference(these: dict, those: dict) -> float:
        assert these.keys() == those.keys() and len(these) == 28
        return max(((these[name] - those[name]).norm() / those[name].norm()).item() for name in these)

    for batch in packed_batches([[40, 25], [70, 9, 30]]):
        torch.manual_seed(5)
        loss, gradients = loss_and_gradients(eager, batch)
        torch.manual_seed(5)
        compiled_loss, compiled_gradients = loss_and_gradients(compiled, batch)
        assert compiled_loss == pytest.approx(loss, rel=tolerance)
        assert largest_difference(compiled_gradients, gradients) < tolerance
        if dropout:
            torch.manual_seed(6)  # other masks: other gradients, so the comparison above can fail
            _, other = loss_and_gradients(eager, batch)
            assert largest_difference(other, gradients) > 3 * tolerance


@pytest.mark.slow
def test_compiled_layers_recompute_seeded_dropout_masks_exactly(tiny_model_dir):
    compiled_against_eager_with_seeded_dropout(tiny_model_dir, CPU, tolerance=1e-5)


def saved_activation_bytes(model, batch: dict) -> int:
    """Bytes autograd keeps for backward over one forward, the model's own weights not counted."""
    weights = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values())


def eight_b_ratios(tmp_path):
    """A tiny Llama of the width ratios of Llama-3-8B (MLP 3.5x hidden, 4 query heads per KV head)."""
    return save_tiny_llama(
        tmp_path / "model",
        build_tokenizer(),
        hidden_size=256,
        intermediate_size=896,
        num_attention_heads=8,
        num_key_value_heads=2,
    )


def matmuls_and_attention_forwards(model, batch: dict) -> tuple[int, int]:
    """Matmuls and attention forwards one training step runs (forward, and what backward recomputes)."""
    from torch.profiler import profile

    from modules.recompute import ATTENTION_KERNELS

    with profile() as recorded:
        loss_and_gradients(model, batch)
    names = [event.name for event in recorded.events()]
    return names.count("aten::mm"), max(names.count(name) for name in ATTENTION_KERNELS)


@pytest.mark.slow
def test_compiled_layers_recompute_elementwise_work_and_never_a_matmul_or_attention(tmp_path):
    """What the compiled layers keep: far less than the compiler's own choice, for the same matmuls and
    attention forwards a step (none of them run again in backward)."""
    model_dir = eight_b_ratios(tmp_path)  # 512 tokens through it
    (batch,) = packed_batches([[300, 212]])
    defaults = {f"ban_recompute_{name}": True for name in ("used_far_apart", "long_fusible_chains")}
    defaults |= {"ban_recompute_materialized_backward": True, "activation_memory_budget": 1.0}
    kept, work = {}, {}
    for ours in (False, True):
        torch._dynamo.reset()
        model, _ = lora_model(model_dir, compiled=True, dropout=0.05, grad_checkpointing=False)  # sets ours
        # The compiler's defaults, before anything compiles (torch's own patch: pytest's monkeypatch
        # would delete the settings on undo, which hides them from the compiler).
        with torch._functorch.config.patch({} if ours else defaults):
            for _ in range(2):  # the first forward compiles
                kept[ours] = saved_activation_bytes(model, batch)
            work[ours] = matmuls_and_attention_forwards(model, batch)
    assert kept[True] < 0.75 * kept[False], kept  # measured: 13.4 against 21.4 MiB
    assert work[True] == work[False] and work[True][1] == 2, work  # one attention forward a layer


@pytest.mark.slow
def test_each_dropout_rung_keeps_less_and_trains_the_same(tmp_path):
    """Auto's second rung computes LoRA dropout's dropped inputs again in backward, from the input and the
    seed, and runs no matmul or attention forward again; the third recomputes matmuls and attention too,
    for less still. Every rung trains the same loss and gradients."""
    from modules.dropout import seeded_dropouts
    from modules.recompute import DROPPED_KEPT, DROPPED_RECOMPUTED, MATMULS_RECOMPUTED_TOO, apply_rung

    model_dir = eight_b_ratios(tmp_path)
    (batch,) = packed_batches([[300, 212]])
    model, _ = lora_model(model_dir, compiled=True, dropout=0.05, grad_checkpointing=False)
    kept, trained, work = {}, {}, {}
    levels = (DROPPED_KEPT, DROPPED_RECOMPUTED, MATMULS_RECOMPUTED_TOO, DROPPED_KEPT)  # and back: compiles per rung
    for level in levels:
        apply_rung(model, (False, None, level))
        assert all(dropout.recompute_input == level for dropout in seeded_dropouts(model)) and seeded_dropouts(model)
        for _ in range(2):  # the first forward compiles
            kept[level] = saved_activation_bytes(model, batch)
        work[level] = matmuls_and_attention_forwards(model, batch)
        torch.manual_seed(3)
        trained[level] = loss_and_gradients(model, batch)
    hidden_sized = 512 * 256 * 4  # one fp32 activation of a layer's width, here 0.5 MiB
    # Measured: 13.4, 12.1 and 10.5 MiB for 2 layers; 92, 92 and 102 matmuls, 2, 2 and 4 attention forwards.
    assert kept[DROPPED_KEPT] - kept[DROPPED_RECOMPUTED] >= 2 * hidden_sized, kept
    assert kept[DROPPED_RECOMPUTED] - kept[MATMULS_RECOMPUTED_TOO] >= 2 * hidden_sized, kept
    assert work[DROPPED_RECOMPUTED] == work[DROPPED_KEPT], work
    assert work[MATMULS_RECOMPUTED_TOO][0] > work[DROPPED_KEPT][0], work
    loss, gradients = trained[DROPPED_KEPT]
    for level in (DROPPED_RECOMPUTED, MATMULS_RECOMPUTED_TOO):
        lean_loss, lean_gradients = trained[level]
        assert lean_loss == pytest.approx(loss, rel=1e-6)
        for name, gradient in gradients.items():
            torch.testing.assert_close(lean_gradients[name], gradient, rtol=1e-5, atol=1e-7)


def independent_masks(model) -> None:
    """Give every LoRA projection a SeededDropout of its own (the counterfactual to shared masks)."""
    from modules.dropout import SeededDropout

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, SeededDropout):
                    own = SeededDropout(dropout.p, int(torch.randint(0, 2**31, ())))
                    dropouts[name] = own.train(dropout.training)


def test_projections_of_one_input_share_one_dropout_mask():
    from modules.dropout import SHARED_INPUTS, input_group

    assert SHARED_INPUTS == (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    layer = "base_model.model.model.layers.3"
    assert {input_group(f"{layer}.self_attn.{p}") for p in ("q_proj", "k_proj", "v_proj")} == {
        f"{layer}.self_attn.q_proj"
    }
    assert input_group(f"{layer}.self_attn.o_proj") == f"{layer}.self_attn.o_proj"
    assert (
        input_group(f"{layer}.mlp.up_proj")
        == input_group(f"{layer}.mlp.gate_proj")
        != input_group("base_model.model.model.layers.4.mlp.up_proj")
    )
    assert input_group(f"{layer}.mlp.down_proj") == f"{layer}.mlp.down_proj"


@pytest.mark.slow
def test_shared_dropout_masks_keep_one_dropped_input_per_input(tmp_path):
    """q, k and v (and gate and up) drop their one input with one mask: the compiled layers compute the
    dropped input once and keep one copy for backward, not one per projection."""
    from modules.dropout import seeded_dropouts, use_seeded_dropout

    model_dir = eight_b_ratios(tmp_path)
    (batch,) = packed_batches([[300, 212]])
    torch._dynamo.reset()  # no graph compiled for an earlier test's model and settings
    model, _ = lora_model(model_dir, compiled=True, dropout=0.05, grad_checkpointing=False)
    attention = model.get_base_model().model.layers[0].self_attn
    q, k, v = (attention.q_proj.lora_dropout["default"], attention.k_proj.lora_dropout["default"],
               attention.v_proj.lora_dropout["default"])  # fmt: skip
    assert q is k is v and q is not attention.o_proj.lora_dropout["default"]
    assert len(seeded_dropouts(model)) == 8  # per layer: q/k/v, o, gate/up, down
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    assert torch.equal(attention.q_proj.lora_dropout["default"](x), attention.v_proj.lora_dropout["default"](x))
    kept = {}
    for sharing in (True, False):
        if not sharing:
            independent_masks(model)
            assert len(seeded_dropouts(model)) == 14
        for _ in range(2):  # the first forward compiles
            kept[sharing] = saved_activation_bytes(model, batch)
    hidden_sized = 512 * 256 * 4  # one fp32 activation of a layer's width, here 0.5 MiB
    # Measured: 13.4 against 14.3 MiB (dropout 0: 12.1); the compiler already recomputed some of the
    # independent dropped inputs from the input and their seeds.
    assert kept[False] - kept[True] >= 1.5 * hidden_sized, kept
    eager, _ = lora_model(model_dir, compiled=False, dropout=0.05, grad_checkpointing=False)
    assert use_seeded_dropout(eager) == 14 and len(seeded_dropouts(eager)) == 8


def attention_kernel_calls(model, batch: dict, context=None) -> tuple[int, int, dict]:
    """Attention forwards and backwards run over one training step, and the step's gradients."""
    from torch.profiler import profile

    with profile() as recorded:
        _, gradients = loss_and_gradients(model, batch, context)
    from modules.recompute import ATTENTION_KERNELS

    # torch.profiler names ops as the policy does; one kernel may show under two nested names (SDPA's
    # op and the kernel's own), so a step's count is the most of any one name.
    names = [event.name for event in recorded.events()]
    forwards = max(names.count(name) for name in ATTENTION_KERNELS)
    backward_names = [name.replace("_forward", "") + "_backward" for name in ATTENTION_KERNELS]
    return forwards, max(names.count(name) for name in backward_names), gradients


def attention_kept_under_offload(model_dir, device, batch: dict, tolerance: float):
    """Compiled layers under checkpointing run the attention forward once a step when offload keeps its
    outputs, twice otherwise, with the gradients of eager layers (within `tolerance`). Returns the
    compiled model and the eager gradients."""
    from modules.recompute import ActivationOffload, apply_recompute, keep_attention_when_offloaded

    eager, _ = lora_model(model_dir, grad_checkpointing=True, device=device)
    _, gradients = loss_and_gradients(eager, batch)
    compiled, _ = lora_model(model_dir, compiled=True, grad_checkpointing=True, device=device)
    layers = compiled.get_base_model().config.num_hidden_layers
    tokens = batch["input_ids"].numel()
    # Samples this short keep nothing more: the attention forward runs again in backward, per layer.
    assert not keep_attention_when_offloaded(compiled, [100] * 8, tokens, "offload")
    loss_and_gradients(compiled, batch)  # compiles
    assert attention_kernel_calls(compiled, batch)[:2] == (2 * layers, layers)
    # Long ones keep it where the host has room for their layer inputs and attention outputs (not for
    # a trillion tokens), and once the mode is offload. What the data holds decides; this batch is the same.
    assert not keep_attention_when_offloaded(compiled, [30000, 10], 10**12, "offload")
    assert keep_attention_when_offloaded(compiled, [30000, 10], tokens, None)
    assert attention_kernel_calls(compiled, batch)[:2] == (2 * layers, layers)  # auto, not yet probed: nothing kept
    for mode, forwards in (("offload", layers), (True, 2 * layers), ("offload", layers)):
        apply_recompute(compiled, mode)
        # What offload moves to CPU memory and back: here anything of a layer input's size and up,
        # so the kept attention outputs too (laid out as the kernel wrote them, not contiguous).
        offload = ActivationOffload(compiled, min_elements=batch["input_ids"].numel() * 16)
        context = offload if mode == "offload" else None
        loss_and_gradients(compiled, batch, context)  # compiles once per mode
        calls = attention_kernel_calls(compiled, batch, context)
        if mode == "offload":
            assert any(shape[-1] == 16 for shape in offload.offloaded)  # attention heads of 16 went too
        assert calls[:2] == (forwards, layers), mode
        assert calls[2].keys() == gradients.keys()
        for name, gradient in gradients.items():  # each gradient's difference relative to its norm
            assert (calls[2][name] - gradient).norm() < tolerance * gradient.norm(), (mode, name)
    return compiled, gradients


@pytest.mark.slow
def test_offloaded_checkpointing_keeps_the_attention_of_long_samples_and_backward_runs_no_attention_forward(
    tiny_model_dir,
):
    from modules.recompute import apply_rung, keeps_attention

    (batch,) = packed_batches([[60, 36]])
    compiled, gradients = attention_kept_under_offload(tiny_model_dir, CPU, batch, tolerance=1e-4)
    # Tiled MLPs (auto's last rung) break the layer's graph: nothing kept, and the attention runs twice as before.
    apply_rung(compiled, ("offload", 32, False))
    assert not keeps_attention(compiled)
    loss_and_gradients(compiled, batch)
    forwards, backwards, tiled = attention_kernel_calls(compiled, batch)
    assert (forwards, backwards) == (4, 2)
    for name, gradient in gradients.items():
        assert (tiled[name] - gradient).norm() < 1e-4 * gradient.norm(), name


def mlp_tiles_in_graph(model_dir, device, batch: dict, tolerance: float) -> dict:
    """Compiled layers checkpointed in their graph, LoRA dropout 0.1 (seeded masks), train alike with
    their MLPs whole and in 3 tiles inside the graph, on (True) and under offload (attention kept):
    the same loss and gradients (each gradient's difference within `tolerance` of its norm), the same
    attention forwards, more matmuls (the tiles ran). Returns each mode's step peaks (whole, tiled)
    in bytes above what was allocated before (0 on the CPU)."""
    from torch.profiler import profile

    from modules.recompute import (
        GRAPH_TILE_TOKENS,
        ActivationOffload,
        apply_recompute,
        graph_tiles,
        keep_attention_when_offloaded,
        plan_graph_tiles,
    )

    torch._dynamo.reset()  # each (mode, tiles) below compiles anew: start below the recompile limit
    compiled, _ = lora_model(model_dir, compiled=True, dropout=0.1, grad_checkpointing=True, device=device)
    layers = compiled.get_base_model().config.num_hidden_layers
    keep_attention_when_offloaded(compiled, [30000, 10], batch["input_ids"].numel(), None)
    peaks = {}
    for mode in (True, "offload"):
        apply_recompute(compiled, mode)
        context = ActivationOffload(compiled) if mode == "offload" and device.type == "cuda" else None
        runs = []
        for tokens in (GRAPH_TILE_TOKENS, 3 * GRAPH_TILE_TOKENS):  # micro-batches of one tile, of three
            assert plan_graph_tiles(compiled, tokens, mode) == graph_tiles(compiled) == tokens // GRAPH_TILE_TOKENS
            loss_and_gradients(compiled, batch, context)  # compiles
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            torch.manual_seed(0)  # the same dropout masks (each forward draws its seeds)
            with profile() as recorded:
                loss, gradients = loss_and_gradients(compiled, batch, context)
            peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else 0
            matmuls = sum(event.name in ("aten::mm", "aten::addmm") for event in recorded.events())
            runs.append((loss, gradients, matmuls, peak, attention_kernel_calls(compiled, batch, context)[:2]))
        (
            (loss, gradients, matmuls, whole, attention),
            (tiled_loss, tiled_gradients, tiled_matmuls, tiled, tiled_attention),
        ) = runs
        assert tiled_loss == pytest.approx(loss, rel=tolerance), mode
        for name, gradient in gradients.items():
            assert (tiled_gradients[name] - gradient).norm() < tolerance * gradient.norm(), (mode, name)
        assert tiled_matmuls > matmuls, mode
        assert tiled_attention == attention == ((layers if mode == "offload" else 2 * layers), layers), mode
        peaks[mode] = whole, tiled
    apply_recompute(compiled, False)  # no checkpoint: the tiles' intermediates would all be kept, so whole
    assert graph_tiles(compiled) == 1
    return peaks


@pytest.mark.slow
def test_mlp_tiles_inside_the_compiled_graph_train_like_the_whole_mlp_and_only_where_they_know_it(tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    from modules.tiling import can_tile_in_graph

    (batch,) = packed_batches([[60, 36]])
    mlp_tiles_in_graph(tiny_model_dir, CPU, batch, tolerance=1e-5)

    model, _ = lora_model(tiny_model_dir, dropout=0.1)
    mlp = model.get_base_model().model.layers[0].mlp
    assert can_tile_in_graph(mlp)

    class OtherMLP(type(mlp)):  # an MLP of another form: its tiles would not be its forward
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)))

    mlp.__class__ = OtherMLP
    assert not can_tile_in_graph(mlp)
    mlp.__class__ = OtherMLP.__bases__[0]
    assert isinstance(mlp.down_proj, LoraLayer)
    mlp.down_proj.merged_adapters = ["default"]  # merged LoRA: base weights changed, no LoRA branch to tile
    assert not can_tile_in_graph(mlp)


def test_seeded_dropout_keeps_one_minus_p_and_draws_new_masks_from_torch_seed():
    from modules.dropout import SeededDropout, keep_mask, reseed

    shape = torch.Size([8, 1000, 128])
    first = keep_mask(torch.tensor(12345), shape, 0.1, CPU)
    assert abs(first.float().mean().item() - 0.9) < 2e-3
    assert torch.equal(first, keep_mask(torch.tensor(12345), shape, 0.1, CPU))
    other = keep_mask(torch.tensor(12346), shape, 0.1, CPU)
    assert abs((first & other).float().mean().item() - 0.81) < 2e-3  # masks of two seeds are independent
    assert abs(first[:, :, 0].float().mean().item() - 0.9) < 1e-2  # no stripe along a dimension
    dropouts = [SeededDropout(0.1, base) for base in (7, 1_000_003)]
    torch.manual_seed(0)
    reseed(dropouts)
    seeds = [dropout.seed.item() for dropout in dropouts]
    assert seeds[1] - seeds[0] == 1_000_003 - 7 and seeds[0] != 7
    torch.manual_seed(0)
    reseed(dropouts)
    assert [dropout.seed.item() for dropout in dropouts] == seeds  # torch.manual_seed (and a resume) repeats them
    reseed(dropouts)
    assert [dropout.seed.item() for dropout in dropouts] != seeds
    x = torch.ones(shape)
    dropped = dropouts[0].train()(x)
    assert torch.allclose(dropped[dropped != 0], torch.tensor(1 / 0.9))  # the kept ones scaled by 1 / (1 - p)
    assert torch.equal(dropped == 0, ~keep_mask(dropouts[0].seed, shape, 0.1, CPU))
    assert torch.equal(dropouts[0].eval()(x), x)


def test_tiled_mlps_keep_peft_dropout_since_they_run_eagerly(tiny_model_dir):
    from modules.dropout import SeededDropout, seeded_dropouts, use_seeded_dropout
    from modules.recompute import tile_decoder_mlps

    def mlp_dropouts(model):
        return [
            d
            for layer in model.get_base_model().model.layers
            for d in layer.mlp.modules()
            if d.__class__.__name__.endswith("Dropout")
        ]

    model, _ = lora_model(tiny_model_dir, dropout=0.1)
    assert use_seeded_dropout(model) == 14  # 7 projections x 2 layers
    tile_decoder_mlps(model, 16)  # as auto's last rung does, after loading
    assert len(seeded_dropouts(model)) == 4  # q/k/v's shared one and o's, in each layer
    assert (
        all(type(d) is torch.nn.Dropout and d.p == 0.1 for d in mlp_dropouts(model)) and len(mlp_dropouts(model)) == 6
    )

    tiled, _ = lora_model(tiny_model_dir, dropout=0.1, tiled_mlp=256)  # train.tiled_mlp: tiled before compiling
    assert use_seeded_dropout(tiled) == 8
    assert not any(isinstance(d, SeededDropout) for d in mlp_dropouts(tiled))


def test_offloaded_activations_are_the_layer_inputs_and_change_no_gradient(tiny_model_dir):
    from modules.loss import CausalLMLoss
    from modules.recompute import ActivationOffload, activation_offload

    model, _ = lora_model(tiny_model_dir, grad_checkpointing=True)
    (batch,) = packed_batches([[60, 36]])  # 96 tokens: a size no weight of the tiny model has
    loss, gradients = loss_and_gradients(model, batch)
    offload = ActivationOffload(model, min_elements=96 * 64)  # hidden size 64: one layer input and up
    offloaded_loss, offloaded_gradients = loss_and_gradients(model, batch, offload)
    assert offloaded_loss == loss
    for name, gradient in gradients.items():
        assert torch.equal(offloaded_gradients[name], gradient)
    assert len(offload.offloaded) >= 2  # at least both decoder layers' inputs
    # Backward found every tensor but the first it asked for copied back ahead, never more than a
    # layer's worth (the forward's bytes over the decoder layers) waiting at once.
    assert offload.fetched_ahead == len(offload.offloaded) - 1
    assert 0 < offload.most_ahead <= offload.saved_bytes / offload.layers
    assert all({94, 95, 96} & set(shape) for shape in offload.offloaded)  # activations of the row, never weights
    assert isinstance(activation_offload("offload", model, torch.device("cuda")), ActivationOffload)
    # The window ahead is a layer's worth of bytes, whatever wraps the model (train.py hands it the loss's).
    assert activation_offload("offload", CausalLMLoss(model, chunked=True), torch.device("cuda")).layers == 2
    assert not isinstance(activation_offload("offload", model, CPU), ActivationOffload)  # nothing to gain
    assert not isinstance(activation_offload(True, model, torch.device("cuda")), ActivationOffload)


def test_compile_says_so_when_it_finds_no_decoder_layer(tiny_model_dir):
    from modules.model import compile_decoder_layers

    model, _ = lora_model(tiny_model_dir)
    model.get_base_model()._no_split_modules = []  # as an architecture that names none
    with pytest.warns(UserWarning, match="no decoder layers found in LlamaForCausalLM"):
        assert compile_decoder_layers(model) == 0
    assert all(getattr(module, "_compiled_call_impl", None) is None for module in model.modules())


def test_tiling_says_so_when_it_finds_no_dense_mlp(tiny_model_dir):
    from modules.recompute import tile_decoder_mlps

    model, _ = lora_model(tiny_model_dir)
    for layer in model.get_base_model().model.layers:
        layer.mlp.experts = torch.nn.ModuleList()  # as a mixture of experts, whose forward returns more
    with pytest.warns(UserWarning, match="no decoder layer with a dense `mlp` in LlamaForCausalLM"):
        assert tile_decoder_mlps(model, 512) == 0
    assert all("forward" not in vars(layer.mlp) for layer in model.get_base_model().model.layers)


def test_auto_recompute_is_measured_only_where_one_step_fills_one_whole_gpu():
    from modules.recompute import resolve_recompute

    cuda = torch.device("cuda")  # a device object; nothing runs on it
    assert resolve_recompute(run_config(), cuda, sharded=False) is None  # probed after loading
    assert resolve_recompute(run_config(), CPU, sharded=False).mode is True
    assert resolve_recompute(run_config(), cuda, sharded=True).why.startswith("auto: under FSDP, where no probe")
    spread = RunConfig.model_validate(
        {"model": {"name_or_path": "m", "device_map": "auto"}, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    )
    assert resolve_recompute(spread, cuda, sharded=False).mode is True
    for mode in (False, True, "offload"):  # a value set is kept as set, also on a GPU
        assert resolve_recompute(run_config(grad_checkpointing=mode), cuda, sharded=False).mode == mode


def test_auto_recompute_keeps_the_fastest_step_that_fits_and_probes_no_further():
    from modules.plan import recompute_line
    from modules.recompute import AUTO_TILE_TOKENS, MEMORY_HEADROOM, RECOMPUTE_LADDER, first_fitting_rung

    gib = 2**30
    budget = 80 * gib
    off, lean, leaner, on = (False, None, 0), (False, None, 1), (False, None, 2), (True, None, 0)
    offload, tiled = ("offload", None, 0), ("offload", AUTO_TILE_TOKENS, 0)

    def climb(peaks: dict, extra: int = 0, ladder=RECOMPUTE_LADDER):
        probed = []

        def probe(rung):
            probed.append(rung)
            return peaks[rung]

        return first_fitting_rung(probe, extra, budget, ladder), probed

    roomy = {off: 60 * gib, lean: 40 * gib, leaner: 30 * gib, on: 10 * gib, offload: 8 * gib, tiled: 6 * gib}
    choice, probed = climb(roomy)
    assert choice.rung == off and probed == [off] and "60.0 GiB" in choice.why
    assert not choice.dropout_recomputed
    choice, probed = climb(roomy | {off: None})  # None: out of memory
    assert choice.rung == lean and probed == [off, lean] and choice.dropout_recomputed and not choice.mode
    assert "40.0 GiB, within 90% of 80.0 GiB; before it off: out of memory" in choice.why  # what was tried
    plan = SimpleNamespace(recompute=choice, device=torch.device("cuda"), loaded=None)  # what recompute_line reads
    assert recompute_line(plan).startswith("off, LoRA dropout's dropped inputs computed again in backward rather than")
    choice, probed = climb(roomy | {off: None, lean: None})
    assert choice.rung == leaner and probed == [off, lean, leaner] and choice.dropout_recomputed == 2
    plan.recompute = choice
    assert "and matmuls and attention forwards where the compiler finds them cheapest" in recompute_line(plan)
    choice, probed = climb(roomy | {off: None, lean: None, leaner: None})
    assert choice.rung == on and probed == [off, lean, leaner, on] and not choice.dropout_recomputed
    over = int(MEMORY_HEADROOM * budget) - 10 * gib + 1  # what the optimizer adds tips checkpointing over
    choice, probed = climb(roomy | {off: None}, extra=over)
    assert choice.rung == offload and probed == [off, lean, leaner, on, offload]
    choice, probed = climb(roomy | {off: None, on: None}, extra=over + 2 * gib)
    assert choice.rung == tiled and choice.tiled == AUTO_TILE_TOKENS and len(probed) == 6  # tiling tips it
    long_rows = {off: None, lean: None, leaner: None, on: None, offload: 30 * gib, tiled: 25 * gib}
    choice, _ = climb(long_rows, extra=60 * gib)  # ran, but over: the leanest rung, said so
    assert choice.rung == tiled and not choice.ran_out and "nothing fit" in choice.why
    choice, _ = climb(long_rows | {offload: None, tiled: None})
    assert choice.rung == tiled and choice.ran_out
    assert "off: out of memory" in choice.why and "offload + tiled MLP: out of memory" in choice.why
    assert "off + dropout recomputed: out of memory" in choice.why
    assert "off + dropout, matmuls recomputed: out of memory" in choice.why
    choice, _ = climb(long_rows | {offload: None}, ladder=RECOMPUTE_LADDER[:-1])  # MLPs tiled already
    assert choice.rung == offload and choice.ran_out


def test_auto_climbs_to_tiled_mlps_only_where_there_are_whole_dense_mlps_to_tile(tiny_model_dir):
    from modules.dropout import use_seeded_dropout
    from modules.recompute import RECOMPUTE_LADDER, recompute_ladder

    model, _ = lora_model(tiny_model_dir, dropout=0.05)  # eager layers: PEFT's dropout, nothing for that rung to do
    without_dropout_rung = tuple(rung for rung in RECOMPUTE_LADDER if not rung[2])
    assert recompute_ladder(model, tiled_mlp=None) == without_dropout_rung  # llama: dense MLPs
    tiled_by_config = ((False, 4096, False), (True, 4096, False), ("offload", 4096, False))  # no tiled rung of its own
    assert recompute_ladder(model, tiled_mlp=4096) == tiled_by_config
    use_seeded_dropout(model)  # what compiled layers take
    assert recompute_ladder(model, tiled_mlp=None) == RECOMPUTE_LADDER
    assert recompute_ladder(model, tiled_mlp=4096)[:2] == ((False, 4096, False), (False, 4096, True))
    for layer in model.get_base_model().model.layers:
        layer.mlp.experts = torch.nn.ModuleList()  # what a mixture of experts has: not tiled
    assert recompute_ladder(model, tiled_mlp=None) == recompute_ladder(model, tiled_mlp=4096) == RECOMPUTE_LADDER[:-1]


def test_every_ddp_process_settles_on_the_leanest_rung_any_of_them_needed(tiny_model_dir):
    from modules.recompute import RECOMPUTE_LADDER, RecomputeChoice, agree_recompute, apply_rung

    ladder = (*RECOMPUTE_LADDER[:-1], ("offload", 32, False))  # tiles this tiny batch can show
    (batch,) = packed_batches([[60, 36]])  # 96 tokens
    model, _ = lora_model(tiny_model_dir, grad_checkpointing=False)
    model.train()
    mine = RecomputeChoice(False, "auto: a step peaked at 1.0 GiB, within 90% of 80.0 GiB")
    assert agree_recompute(model, mine, ladder, 0, 96) is mine  # nobody needed more
    with pytest.raises(UserError, match="even with checkpointing offloaded to CPU memory and MLPs in tiles of 32"):
        agree_recompute(model, mine, ladder, len(ladder), 96)  # one process ran out on every rung
    settled = agree_recompute(model, mine, ladder, len(ladder) - 1, 96)  # another process needed the tiled rung
    assert settled.rung == ("offload", 32, False) and "another process needed it" in settled.why
    assert is_checkpointing(model.get_base_model())
    calls = count_mlp_passes(model)
    model(**batch)  # a training forward
    assert len(calls) == 3  # tiled here too: 3 tiles of 32 (a whole MLP is one pass)
    mlp = model.get_base_model().model.layers[0].mlp
    forward = mlp.forward
    apply_rung(model, ("offload", 32, False))  # as every probe does: tiled alike already, left as it is
    assert mlp.forward is forward  # so compiled layers need not recompile


def count_mlp_passes(model) -> list[int]:
    """Calls of the first layer's gate projection: one per MLP pass over a row or over a tile."""
    calls = []
    model.get_base_model().model.layers[0].mlp.gate_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.slow
def test_the_tiled_rung_tiles_mlps_that_compiled_layers_already_ran_whole(tiny_model_dir):
    from modules.model import compile_decoder_layers
    from modules.recompute import apply_rung

    (batch,) = packed_batches([[60, 36]])  # 96 tokens: 3 tiles of 32
    model, _ = lora_model(tiny_model_dir)
    model.train()
    compile_decoder_layers(model)
    loss, gradients = loss_and_gradients(model, batch)  # compiled, whole MLPs
    apply_rung(model, ("offload", 32, False))
    assert is_checkpointing(model.get_base_model())
    calls = count_mlp_passes(model)  # the compiled graph runs a whole MLP without calling its hooks
    model(**batch)
    assert len(calls) == 3  # the compiled layer now calls the MLP tile by tile
    tiled_loss, tiled_gradients = loss_and_gradients(model, batch)
    assert tiled_loss == pytest.approx(loss, rel=1e-5)
    for name, gradient in gradients.items():
        assert torch.allclose(tiled_gradients[name], gradient, rtol=1e-4, atol=1e-6), name


def test_a_probe_step_runs_the_mode_asked_and_leaves_no_trace(tiny_model_dir):
    from modules.loss import CausalLMLoss
    from modules.recompute import probe_step

    model, _ = lora_model(tiny_model_dir, dropout=0.1)  # auto on the CPU: checkpointing on
    model.eval()  # the probe trains as the run will, dropout and checkpointing included, and puts this back
    (batch,) = packed_batches([[60, 36]])
    _, gradients = loss_and_gradients(model, batch)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    layer = model.get_base_model().model.layers[0].input_layernorm  # inside what checkpointing recomputes
    calls = []
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    rng = torch.get_rng_state()
    precision = Precision("no", torch.float32)
    for mode, forwards in ((False, 1), (True, 2), ("offload", 2)):  # checkpointing runs the layer again
        calls.clear()
        assert probe_step(CausalLMLoss(model, chunked=True), batch, mode, precision, CPU) == 0  # memory not counted
        assert len(calls) == forwards, mode
        assert is_checkpointing(model.get_base_model()) is bool(mode)
    assert torch.equal(torch.get_rng_state(), rng)  # though dropout drew masks
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters() if p.requires_grad)
    _, after = loss_and_gradients(model, batch)
    assert all(torch.equal(after[name], gradient) for name, gradient in gradients.items())  # training unchanged


def test_a_probe_step_takes_the_varlen_collators_batches_whose_lengths_are_integers(tiny_model_dir):
    from modules.loss import CausalLMLoss
    from modules.packing import PackedCollator
    from modules.recompute import probe_step

    model, _ = lora_model(tiny_model_dir)
    batch = PackedCollator(varlen_kwargs=True)([[{"input_ids": [5] * 30, "labels": [5] * 30}] * 2])
    assert any(isinstance(value, int) for value in batch.values())  # max_length_q / max_length_k
    assert probe_step(CausalLMLoss(model, chunked=True), batch, False, Precision("no", torch.float32), CPU) == 0


def test_placement_names_the_devices_that_hold_the_decoder_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.model import placement

    shape = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    model = get_peft_model(LlamaForCausalLM(shape), LoraConfig(target_modules=["q_proj"]))  # unquantized: can move
    assert placement(model, gpus=0) == "3 layer(s) on cpu"
    assert "device_map auto left the other 1 idle" in placement(model, gpus=2)  # fits one: says to go data parallel
    model.get_base_model().model.layers[2].to("meta")  # the CPU's stand-in for a second GPU
    assert placement(model, gpus=2) == "2 layer(s) on cpu, 1 layer(s) on meta"


def test_the_probe_batch_is_the_heaviest_micro_batch_packed_or_padded():
    import datasets

    from modules.data import PaddingCollator
    from modules.packing import PackedCollator, PackedDataset
    from modules.recompute import heaviest_batch

    lengths = [5, 40, 12, 33, 7, 25, 18]
    samples = datasets.Dataset.from_dict(
        {"input_ids": [[3] * n for n in lengths], "labels": [[3] * n for n in lengths], "length": lengths}
    )
    packed = PackedDataset(samples, capacity=45)
    bins = sorted((sum(packed.lengths[i] for i in bin_) for bin_ in packed.bins), reverse=True)
    assert heaviest_batch(packed, PackedCollator(), 2)["input_ids"].numel() == bins[0] + bins[1]
    padded = heaviest_batch(samples, PaddingCollator(0), 3)
    assert padded["input_ids"].shape == (3, 40) and padded["attention_mask"].sum() == 40 + 33 + 25


def saved_bytes(model, batch: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one forward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def test_tiled_mlps_train_exactly_like_whole_ones_and_keep_no_intermediate(tiny_model_dir):
    from modules.recompute import tile_decoder_mlps

    (batch,) = packed_batches([[60, 36]])  # 96 tokens: 3 tiles of 32
    for recompute in (False, True):
        model, _ = lora_model(tiny_model_dir, grad_checkpointing=recompute)
        model.train()
        names = [name for name, _ in model.named_parameters()]
        loss, gradients = loss_and_gradients(model, batch)
        whole_saved = saved_bytes(model, batch)
        inputs = {name: tensor for name, tensor in batch.items() if name != "labels"}  # logits, not the loss
        with torch.no_grad():
            whole_logits = model(**inputs).logits
        assert tile_decoder_mlps(model, 32) == 2  # both decoder layers
        assert [name for name, _ in model.named_parameters()] == names  # the adapter saves under the same names
        tiled_loss, tiled_gradients = loss_and_gradients(model, batch)
        assert tiled_loss == pytest.approx(loss, rel=1e-6)
        for name, gradient in gradients.items():
            assert torch.allclose(tiled_gradients[name], gradient, rtol=1e-4, atol=1e-6), name
        with torch.no_grad():  # evaluation and generation: the same logits
            assert torch.allclose(model(**inputs).logits, whole_logits, atol=1e-5)
        if not recompute:  # what a whole MLP keeps: at least its gate and up outputs, 96 x 128 fp32 each, per layer
            assert whole_saved - saved_bytes(model, batch) >= 2 * 2 * 96 * 128 * 4


@pytest.mark.slow
def test_tiled_mlps_run_eagerly_inside_compiled_layers(tiny_model_dir):
    from modules.model import compile_decoder_layers
    from modules.recompute import tile_decoder_mlps

    (batch,) = packed_batches([[60, 36]])
    model, _ = lora_model(tiny_model_dir, grad_checkpointing=True)
    model.train()
    tile_decoder_mlps(model, 32)
    loss, gradients = loss_and_gradients(model, batch)
    compile_decoder_layers(model)
    compiled_loss, compiled_gradients = loss_and_gradients(model, batch)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for name, gradient in gradients.items():
        assert torch.allclose(compiled_gradients[name], gradient, rtol=1e-4, atol=1e-6), name


def test_tiled_mlp_is_a_token_count_and_is_refused_under_fsdp():
    from modules.errors import UserError
    from modules.recompute import check_tiled_mlp

    assert run_config().train.tiled_mlp is None
    assert run_config(tiled_mlp=8192).train.tiled_mlp == 8192
    assert run_config(tiled_mlp=False).train.tiled_mlp is None  # off, as null
    with pytest.raises(ValidationError, match="a number of tokens per tile"):
        run_config(tiled_mlp=True)
    with pytest.raises(ValidationError, match="greater than or equal to 256"):
        run_config(tiled_mlp=16)
    check_tiled_mlp(run_config(tiled_mlp=8192), sharded=False)
    with pytest.raises(UserError, match="train.tiled_mlp=null"):
        check_tiled_mlp(run_config(tiled_mlp=8192), sharded=True)


@pytest.mark.parametrize("loader", ["training", "chat-and-merge"])
def test_a_cpu_with_avx512_bf16_cannot_change_what_4bit_layers_compute(tmp_path, tiny_model_dir, monkeypatch, loader):
    """bitsandbytes repacks 4-bit weights into a CPU-only layout with a bf16 kernel, in eval mode without
    grad, where it finds AVX512-BF16. Forced on here as on such a CPU: eval and generation must still
    compute exactly what training does, and the weights keep the layout that state dicts save."""
    import bitsandbytes.nn.modules

    from modules.adapter import AdapterInfo, load_with_adapter

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)  # this CPU, as bitsandbytes sees it
    if loader == "training":
        model, tokenizer = lora_model(tiny_model_dir)
    else:
        trained, tokenizer = lora_model(tiny_model_dir)
        trained.save_pretrained(tmp_path / "adapter")
        info = AdapterInfo(folder=tmp_path / "adapter", base=str(tiny_model_dir), config={}, quant={})
        model = load_with_adapter(info, "4bit", CPU, tokenizer)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.dtype == torch.uint8 for layer in layers)
    batch = tokenizer("What is the capital of France?", return_tensors="pt")

    model.train()  # dropout is 0: training mode computes what eval should
    with torch.no_grad():
        in_training = model(**batch).logits
    model.eval()
    with torch.no_grad():
        in_eval = model(**batch).logits
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    assert all(layer.weight.dtype == torch.uint8 for layer in layers)
    torch.testing.assert_close(in_eval, in_training, rtol=0, atol=0)
