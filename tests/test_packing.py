"""Padding-free packing: the bins, the flattened rows, and exact equivalence with unpacked samples."""

import random

import pytest
import torch
from conftest import nf4

from modules.packing import PackedCollator, PackedDataset, best_fit_decreasing, same_length_rows
from modules.tokens import IGNORE_INDEX


def naive_best_fit_decreasing(lengths, capacity):
    """The textbook O(n x bins) version, to check the fast one against."""
    bins, space = [], []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b in range(len(bins)) if space[b] >= lengths[index]]
        if fits:
            best = min(fits, key=lambda b: space[b])  # the tightest bin
            bins[best].append(index)
            space[best] -= lengths[index]
        else:
            bins.append([index])
            space.append(capacity - lengths[index])
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_matches_the_textbook_algorithm(seed):
    rng = random.Random(seed)
    capacity = 64
    lengths = [min(capacity, max(1, int(rng.lognormvariate(2.5, 0.9)))) for _ in range(300)]
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    naive = naive_best_fit_decreasing(lengths, capacity)
    # Ties between equally full bins may break differently, but the multiset of bin loads is the same.
    loads = lambda packing: sorted(sum(lengths[i] for i in b) for b in packing)  # noqa: E731
    assert loads(bins) == loads(naive)
    assert len(bins) <= -(-sum(lengths) * 11 // (9 * capacity)) + 1  # BFD's bound: 11/9 OPT + 1


def test_best_fit_fills_the_tightest_bin():
    # Sorted: 6, 5, 4, 3, 2. 6 and 5 open bins (free 4 and 5); 4 goes to the tightest (free 4 -> 0),
    # 3 to the other (5 -> 2), 2 into that one (2 -> 0). First fit would have put 4 into the same bin.
    assert sorted(map(sorted, best_fit_decreasing([6, 5, 4, 3, 2], 10))) == [[0, 2], [1, 3, 4]]


def test_collator_flattens_bins_with_restarting_positions_and_masked_first_labels():
    bins = [
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}],
        [{"input_ids": [6], "labels": [6]}],
    ]
    batch = PackedCollator(varlen_kwargs=True)(bins)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100]]  # no sample predicts the next one's start
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_k"] == 3
    assert "attention_mask" not in batch and "cu_seq_lens_q" not in PackedCollator()(bins)


def test_packed_dataset_reports_efficiency_and_shards_without_repeats():
    import datasets

    lengths = [7, 5, 3, 3, 2, 1]
    samples = datasets.Dataset.from_list(
        [{"input_ids": list(range(n)), "labels": list(range(n)), "length": n} for n in lengths]
    )
    packed = PackedDataset(samples, capacity=8)
    assert len(packed) == 3 and packed.efficiency == pytest.approx(21 / 24)
    assert sorted(len(s["input_ids"]) for b in range(len(packed)) for s in packed[b]) == sorted(lengths)
    shards = [list(packed.shard(2, i).indices) for i in range(2)]
    assert shards == [[0, 1], [2]]


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def build(attention: str):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, quantization_config=nf4(), dtype=torch.float32, attn_implementation=attention
        )
        model.config.use_cache = False  # as in training: with a KV cache, transformers ignores packed positions
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
        model = get_peft_model(model, lora)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapter changes the output and has gradients to compare
                torch.nn.init.normal_(parameter, std=0.5)
        return model

    return build


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_the_summed_loss_and_gradients_of_its_samples_run_alone(lora_model, attention):
    model = lora_model(attention)
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in (9, 5, 12, 3):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX if i < 2 else token for i, token in enumerate(ids)]  # a masked prompt
        samples.append({"input_ids": ids, "labels": labels})

    def loss_and_grads(batch):
        batch = {key: value.to(model.device) for key, value in batch.items()}  # the GPU when the suite runs there
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=torch.tensor(1, device=model.device)).loss  # the summed CE
        loss.backward()
        grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach().cpu(), grads

    packed_loss, packed_grads = loss_and_grads(PackedCollator()([samples[:2], samples[2:]]))
    alone_loss, alone_grads = torch.zeros(()), None
    for sample in samples:
        batch = {key: torch.tensor([value]) for key, value in sample.items()}
        loss, grads = loss_and_grads(batch)
        alone_loss += loss
        alone_grads = grads if alone_grads is None else {n: alone_grads[n] + g for n, g in grads.items()}
    assert packed_loss.item() == pytest.approx(alone_loss.item(), rel=1e-5)
    for name, grad in alone_grads.items():  # fp32 sums in another order: equal to rounding, tensor-wise
        error = (packed_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-4, f"{name}: relative gradient error {error:.2e}"

    # The check has teeth: the same row without restarting positions lets samples attend to each other.
    leaky = PackedCollator()([samples[:2], samples[2:]])
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
    leaky_loss, _ = loss_and_grads(leaky)
    assert abs(leaky_loss.item() - alone_loss.item()) > 1e-3 * alone_loss.item()


def test_same_length_rows_attend_as_each_sample_alone_with_repeated_key_value_heads():
    torch.manual_seed(0)
    rows, length = 3, 10
    q = torch.randn(rows * length, 4, 8, requires_grad=True)  # (tokens, heads, dim), samples one after another
    k, v = (torch.randn(rows * length, 2, 8) for _ in range(2))  # 2 key/value heads, each for 2 query heads
    out = same_length_rows(q, k, v, rows, scale=0.3)
    assert out.shape == q.shape
    for row in range(rows):
        part = slice(row * length, (row + 1) * length)
        repeated = (q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
        alone = torch.nn.functional.scaled_dot_product_attention(
            *(t[part].transpose(0, 1) for t in repeated), is_causal=True, scale=0.3
        )
        torch.testing.assert_close(out[part], alone.transpose(0, 1))
