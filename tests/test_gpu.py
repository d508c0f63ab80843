"""The GPU path: bf16 autocast, NF4 matmuls on CUDA, CUDA peak memory. Skipped without a GPU."""

import inspect

import pytest
import torch
from conftest import write_config
from test_train import read_metrics, run_cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_gpu_run_uses_bf16_and_reports_cuda_memory(tmp_path, tiny_model_dir, chat_file):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "autocast bf16, compute bfloat16" in result.stdout
    assert "x cuda (" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]
    assert 0 < records[-1]["peak_memory_gib"] < 2  # torch's CUDA allocator, not the process RSS


def test_packed_rows_through_the_varlen_kernel_equal_each_sample_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from modules.packing import VARLEN, PackedCollator, register_varlen_attention, varlen_available
    from modules.tokens import IGNORE_INDEX

    if not varlen_available(torch.device("cuda")):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10 on an Ampere or newer GPU")
    register_varlen_attention()

    def load(attention):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attention, device_map={"": "cuda"}
        )
        model.config.use_cache = False
        return model

    packed_model, alone_model = load(VARLEN), load("sdpa")
    generator = torch.Generator().manual_seed(0)
    samples = []
    for length in (37, 5, 120, 64):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:]]})
    batch = PackedCollator(varlen_kwargs=True)([samples[:2], samples[2:]])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    packed = packed_model(**batch, num_items_in_batch=torch.tensor(1)).logits[0].float()
    start = 0
    for sample in samples:
        ids = torch.tensor([sample["input_ids"]], device="cuda")
        alone = alone_model(input_ids=ids).logits[0].float()
        piece = packed[start : start + ids.shape[1]]
        assert (piece - alone).norm() / alone.norm() < 2e-2  # bf16 kernels differ only by rounding
        start += ids.shape[1]

    # Unpacked inputs (samples, chat) fall back to SDPA with its usual masks, padding included.
    ids = torch.tensor([samples[0]["input_ids"]], device="cuda")
    torch.testing.assert_close(packed_model(input_ids=ids).logits, alone_model(input_ids=ids).logits)
    padded = torch.tensor([[0, 0, *samples[1]["input_ids"]], [5, 6, *samples[1]["input_ids"]]], device="cuda")
    mask = torch.tensor([[0, 0] + [1] * 5, [1] * 7], device="cuda")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "use_cache": True}
    with torch.no_grad():
        expected = alone_model.generate(input_ids=padded, attention_mask=mask, **kwargs)
        assert torch.equal(packed_model.generate(input_ids=padded, attention_mask=mask, **kwargs), expected)


def test_gpu_run_with_packing_picks_the_varlen_kernel(tmp_path, tiny_model_dir, chat_file):
    from modules.packing import varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10 on an Ampere or newer GPU")
    config = write_config(
        tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run", train={"micro_batch_size": 1}
    )
    result = run_cli("--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attention        varlen" in result.stdout and "packed into" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]


def test_offloaded_checkpointing_trains_exactly_like_plain_checkpointing(tmp_path, tiny_model_dir, chat_file):
    runs = {}
    for recompute in (True, "offload"):
        output = tmp_path / f"run-{recompute}"
        train = {"grad_checkpointing": recompute, "max_steps": 6}
        config = write_config(tmp_path / f"{recompute}.yaml", tiny_model_dir, chat_file, output, train=train)
        result = run_cli("--config", str(config))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "torch.compile on" in result.stdout  # the GPU default: offload runs around compiled layers
        runs[recompute] = [record["loss"] for record in read_metrics(output) if "loss" in record]
    assert "layer inputs offloaded to pinned CPU memory" in result.stdout
    assert runs["offload"] == pytest.approx(runs[True], rel=1e-5)  # the copies are exact


def test_auto_recompute_probes_one_step_and_trains_without_checkpointing_where_it_fits(
    tmp_path, tiny_model_dir, chat_file
):
    config = write_config(tmp_path / "run.yaml", tiny_model_dir, chat_file, tmp_path / "run")
    result = run_cli("--config", str(config))  # train.grad_checkpointing auto, the default
    assert result.returncode == 0, result.stderr[-3000:]
    print(next(line for line in result.stdout.splitlines() if "grad checkpointing" in line))  # for the record
    assert "grad checkpointing off (auto: a step peaked at" in result.stdout
    records = read_metrics(tmp_path / "run")
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]


def test_each_rung_of_the_recompute_ladder_needs_less_memory_on_long_rows(tiny_model_dir):
    from modules.config import RunConfig
    from modules.hardware import Precision
    from modules.loss import CausalLMLoss
    from modules.model import load_model, load_tokenizer
    from modules.recompute import probe_step

    config = RunConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "x.jsonl"}, "output_dir": "o"}
    )
    cuda = torch.device("cuda")
    precision = Precision("bf16", torch.bfloat16)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(config, str(tiny_model_dir), tokenizer, precision, "sdpa", cuda)
    ids = torch.randint(3, 300, (4, 4096))  # whole rows: causal attention, no mask to dominate the peak
    batch = {"input_ids": ids, "labels": ids}
    with_loss = CausalLMLoss(model, chunked=True)
    peaks = {mode: probe_step(with_loss, batch, mode, precision, cuda) for mode in (False, True, "offload")}
    print({mode: f"{peak / 2**20:.0f} MiB" for mode, peak in peaks.items()})  # for the record (pytest -s)
    assert peaks[False] > peaks[True] >= peaks["offload"] > 0, peaks
    assert all(p.grad is None for p in model.parameters())


def test_offloaded_checkpointing_keeps_the_attention_of_long_samples_on_the_gpu(tiny_model_dir):
    from test_model import attention_kept_under_offload

    ids = torch.randint(3, 300, (2, 512))  # whole rows: SDPA's dense causal kernel
    attention_kept_under_offload(tiny_model_dir, torch.device("cuda"), {"input_ids": ids, "labels": ids}, 0.1)


def test_mlp_tiles_inside_the_compiled_graph_lower_the_step_peak_on_the_gpu(tmp_path):
    from conftest import build_tokenizer, save_tiny_llama
    from test_model import mlp_tiles_in_graph

    # MLPs 16x the hidden size, 12,288 tokens: their intermediates are most of a layer's backward.
    model_dir = save_tiny_llama(tmp_path / "wide-mlp", build_tokenizer(), hidden_size=128, intermediate_size=2048)
    ids = torch.randint(3, 300, (1, 12288))
    peaks = mlp_tiles_in_graph(model_dir, torch.device("cuda"), {"input_ids": ids, "labels": ids}, 0.1)
    print({mode: f"{whole / 2**20:.0f} -> {tiled / 2**20:.0f} MiB" for mode, (whole, tiled) in peaks.items()})
    for mode, (whole, tiled) in peaks.items():
        assert tiled < 0.7 * whole, (mode, peaks)


def test_compiled_layers_recompute_seeded_dropout_masks_exactly_on_the_gpu(tiny_model_dir):
    from test_model import compiled_against_eager_with_seeded_dropout

    from modules.dropout import keep_mask

    cuda = torch.device("cuda")
    seed = torch.tensor(987654321, device=cuda)
    shape = torch.Size([4, 2048, 512])
    eager = keep_mask(seed, shape, 0.05, cuda)
    assert torch.equal(torch.compile(keep_mask)(seed, shape, 0.05, cuda), eager)
    assert torch.equal(keep_mask(seed.cpu(), shape, 0.05, torch.device("cpu")), eager.cpu())  # same bits everywhere
    compiled_against_eager_with_seeded_dropout(tiny_model_dir, cuda, tolerance=0.1, dropout=0.1)
    compiled_against_eager_with_seeded_dropout(tiny_model_dir, cuda, tolerance=0.1, dropout=0.1, recompute_inputs=True)
    compiled_against_eager_with_seeded_dropout(tiny_model_dir, cuda, tolerance=0.1, dropout=0.0)


def test_stacked_lora_a_products_train_like_separate_ones_on_the_gpu(tmp_path):
    """In bf16 on the GPU, the compiled layers' stacked LoRA A products (modules.fusion) run fewer matmuls
    for the loss and gradients of separate ones, within bf16's rounding."""
    from test_fusion import separate_and_stacked_products
    from test_model import eight_b_ratios

    work, trained = separate_and_stacked_products(eight_b_ratios(tmp_path), torch.device("cuda"))
    for level in {level for _, level in work}:
        assert work[False, level][0] - work[True, level][0] == 16, work
        loss, gradients = trained[False, level]
        stacked_loss, stacked_gradients = trained[True, level]
        assert stacked_loss == pytest.approx(loss, rel=1e-2)
        for name, gradient in gradients.items():
            assert torch.linalg.norm(stacked_gradients[name] - gradient) <= 0.05 * torch.linalg.norm(gradient), name


def test_linear_cross_entropy_equals_the_checkpointed_loss_on_the_gpu():
    from modules.loss import chunked_cross_entropy
    from modules.tokens import IGNORE_INDEX

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    head = torch.nn.Linear(256, 32000, bias=False, device=cuda, dtype=torch.bfloat16)
    hidden = torch.randn(2, 3000, 256, device=cuda, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 32000, (2, 3000), device=cuda)
    labels[:, :700] = IGNORE_INDEX  # prompts: 4,598 trained positions, the last chunk partial

    def loss_and_grad(compiled: bool, trained_head: bool):
        head.weight.requires_grad_(trained_head)  # a trained head takes the checkpointed path
        hidden.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total = chunked_cross_entropy(hidden, head, labels, chunk=1024, compiled=compiled)
        (total * 0.5).backward()  # the step's scaling reaches the precomputed gradient
        return total.item(), hidden.grad.float()

    expected_loss, expected_grad = loss_and_grad(compiled=False, trained_head=True)
    for compiled in (False, True):
        loss, grad = loss_and_grad(compiled, trained_head=False)
        assert loss == pytest.approx(expected_loss, rel=1e-3), compiled
        assert (grad - expected_grad).norm() / expected_grad.norm() < 1e-2, compiled


def test_nf4_dequantized_in_the_compiled_graph_equals_bitsandbytes_on_the_gpu():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from test_nf4 import arguments, quantized

    from modules.nf4 import compiled_4bit_forwards, dequantize_nf4

    for shape, dtype, nested in (((1000, 832), torch.bfloat16, True), ((384, 320), torch.float32, False)):
        packed, state = quantized(shape, dtype, nested, device="cuda")  # 13,000 absmaxes: a partial block
        assert torch.equal(dequantize_nf4(*arguments(packed, state)), F.dequantize_4bit(packed, state))

    torch.manual_seed(0)
    weight = torch.randn(1024, 768, device="cuda", dtype=torch.bfloat16)

    def layer():
        module = bnb.nn.Linear4bit(768, 1024, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        module.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4")
        return module.cuda()

    x = torch.randn(3, 500, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    reference = layer()(x)
    reference.float().square().sum().backward()
    expected_grad, x.grad = x.grad, None
    ours = layer()
    assert compiled_4bit_forwards(ours) == (1, 0)
    output = torch.compile(ours)(x)
    output.float().square().sum().backward()
    torch.testing.assert_close(output, reference)  # the same weight, the same cuBLAS product
    torch.testing.assert_close(x.grad, expected_grad)


@pytest.mark.parametrize("lengths", [[37, 5, 120, 64], [120, 120, 120]])  # packed samples; same-length rows
def test_the_varlen_backend_takes_grouped_heads_as_they_are_and_equals_repeated_heads_on_the_gpu(lengths):
    from torch.nn.attention.varlen import varlen_attn
    from transformers import AttentionInterface

    from modules.packing import VARLEN, register_varlen_attention, varlen_available

    if not varlen_available(torch.device("cuda")):
        pytest.skip("torch.nn.attention.varlen needs torch >= 2.10 on an Ampere or newer GPU")
    register_varlen_attention()
    backend = AttentionInterface()[VARLEN]
    torch.manual_seed(0)
    tokens, longest = sum(lengths), max(lengths)
    cumulative = torch.tensor([0, *lengths], device="cuda").cumsum(0, dtype=torch.int32)
    # (1, heads, tokens, dim) as transformers passes them: 8 query heads, 2 key/value heads
    q = torch.randn(1, 8, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    target = torch.randn(tokens, 8, 64, device="cuda", dtype=torch.bfloat16)
    sizes = {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest, "max_length_k": longest}

    def run(function):
        for tensor in (q, k, v):
            tensor.grad = None
        out = function(q, k, v)
        (out.float() * target).sum().backward()
        return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]

    def repeated_heads(q, k, v):
        q, k, v = (tensor[0].transpose(0, 1) for tensor in (q, k, v))
        k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        causal = {"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters else {}
        causal = causal or {"window_size": (-1, 0)}
        return varlen_attn(q, k, v, cumulative, cumulative, longest, longest, **causal)

    def through_the_backend(q, k, v):
        return backend(torch.nn.Module(), q, k, v, None, **sizes)[0][0]

    expected = run(repeated_heads)
    for function in (through_the_backend, torch.compile(through_the_backend)):
        for ours, reference in zip(run(function), expected, strict=True):
            assert (ours - reference).norm() / reference.norm() < 1e-2


def test_same_length_rows_keep_grouped_heads_unrepeated_in_less_memory_on_the_gpu():
    """SDPA gets the 8 key/value heads of 32 query heads as they are: the same outputs and gradients
    as with the heads repeated (eager and compiled), and a smaller peak (no repeated copies, no sum
    over them in backward)."""
    from modules.packing import same_length_rows

    torch.manual_seed(0)
    rows, length = 2, 4096
    q = torch.randn(rows * length, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(rows * length, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)
    )
    target = torch.randn_like(q)

    def run(function):
        for tensor in (q, k, v):
            tensor.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = function(q, k, v)
        (out.float() * target).sum().backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()], peak

    def repeated(q, k, v):
        return same_length_rows(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), rows, None)

    def grouped(q, k, v):
        return same_length_rows(q, k, v, rows, None)

    expected, repeated_peak = run(repeated)
    for function in (grouped, torch.compile(grouped)):
        got, peak = run(function)
        for ours, reference in zip(got, expected, strict=True):
            assert (ours - reference).norm() / reference.norm() < 1e-2
        print(f"step peak: repeated heads {repeated_peak / 2**20:.0f}, grouped {peak / 2**20:.0f} MiB")
        assert peak < repeated_peak - 32 * 2**20  # the repeated K and V alone are 2 x 48 MiB more


def test_the_step_boundary_never_waits_for_the_gpu(tmp_path, tiny_model_dir, chat_file, monkeypatch):
    """Between one step's backward and the next step's forward the host queues the optimizer step and
    reads the last step's outcome from a copy already landed, never a value the GPU is still computing:
    no synchronizing CUDA call from the loop's own code (train.py, modules/tracking.py,
    modules/signals.py) or the loss (modules/loss.py) while it trains. A NaN step is still skipped,
    counted and logged."""
    import warnings

    from test_runs import nan_on_forward
    from test_train import train_in_process

    import train as train_script

    nan_on_forward(monkeypatch, bad_calls={3})
    real_fit = train_script.fit
    recorded = []

    def fit(run):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.ones(1, device="cuda").item()  # one wait of our own: the mode is on and reports it
                return real_fit(run)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            recorded.extend(caught)

    monkeypatch.setattr(train_script, "fit", fit)
    # Checkpointing set, not auto: auto's probe steps would run forwards before the first step.
    overrides = ("train.max_steps=6", "train.grad_checkpointing=true")
    result = train_in_process(tmp_path, tiny_model_dir, chat_file, "run", *overrides)
    syncs = [w for w in recorded if "synchronizing" in str(w.message)]
    # The mode was on and names the Python line that waited.
    assert any(w.filename.endswith("test_gpu.py") for w in syncs), [w.filename for w in syncs]
    loop_files = ("train.py", "tracking.py", "signals.py", "loss.py")
    at_boundary = [f"{w.filename}:{w.lineno}" for w in syncs if w.filename.endswith(loop_files)]
    assert not at_boundary, at_boundary
    records = read_metrics(result.output_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] is None and all(r["loss"] is not None for r in records if r["step"] != 3)
