"""Generation: titan's greedy decoding with the key/value cache against transformers'
``generate(do_sample=False)`` on tiny random HF models of every family, against titan's own
decoding without the cache, batched against one prompt at a time; sampling and bad input."""

from __future__ import annotations

import pytest
import torch

from test_convert import llama_config, random_llama
from test_deepseek_hf import YARN, deepseek_config, random_deepseek
from test_qwen3 import qwen3_config, random_qwen3
from test_qwen3_moe_hf import moe_config, random_qwen3_moe
from titan_core import load_pretrained
from titan_core.errors import UserError
from titan_core.generate import generate, next_tokens

transformers = pytest.importorskip("transformers")

NEW = 16
# Prompts of different lengths, so the batch is left-padded.
PROMPTS = [[5, 17, 3, 44, 9, 71, 30], [12, 8], [90, 61, 2, 2, 33, 47, 58, 19, 4, 26, 11]]
FAMILIES = {
    "llama31-gqa": lambda: random_llama(
        llama_config(
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    ),
    "qwen3": lambda: random_qwen3(qwen3_config(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3-moe": lambda: random_qwen3_moe(moe_config(num_experts=4, num_experts_per_tok=2)),
    "deepseek-v3-yarn": lambda: random_deepseek(
        deepseek_config(q_lora_rank=20, n_group=2, topk_group=1, rope_parameters=YARN)
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    reference = FAMILIES[request.param]()
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    reference.save_pretrained(folder)
    return reference, load_pretrained(folder)


def hf_greedy(reference, prompt, eos=None):
    """transformers' greedy continuation of one unpadded prompt."""
    ids = torch.tensor([prompt])
    out = reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    new = out[0, len(prompt) :].tolist()
    if eos is not None and eos in new:  # transformers pads the rows that ended early
        new = new[: new.index(eos) + 1]
    return new


def test_cached_greedy_equals_transformers_and_uncached(family):
    reference, model = family
    expected = [hf_greedy(reference, p) for p in PROMPTS]
    assert all(len(e) == NEW for e in expected)
    assert generate(model, PROMPTS, max_new_tokens=NEW) == expected
    assert generate(model, PROMPTS, max_new_tokens=NEW, use_cache=False) == expected


def test_rows_stop_at_eos_like_transformers(family):
    reference, model = family
    full = generate(model, PROMPTS, max_new_tokens=NEW)
    eos = full[0][4]  # an id row 0 emits: it must end there; the others wherever they emit it
    expected = [hf_greedy(reference, p, eos=eos) for p in PROMPTS]
    got = generate(model, PROMPTS, max_new_tokens=NEW, eos_ids=[eos])
    assert got == expected
    assert got[0] == full[0][: full[0].index(eos) + 1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "hf"
    random_llama(llama_config(num_key_value_heads=2)).save_pretrained(folder)
    return load_pretrained(folder)


def test_a_row_decodes_alike_alone_and_in_a_batch(llama):
    batched = generate(llama, PROMPTS, max_new_tokens=NEW)
    assert batched == [generate(llama, [p], max_new_tokens=NEW)[0] for p in PROMPTS]


def test_sampling_is_seeded_and_honours_top_k(llama):
    model = llama
    kwargs = dict(max_new_tokens=NEW, temperature=1.5, top_k=3)
    first = generate(model, PROMPTS, seed=7, **kwargs)
    assert first == generate(model, PROMPTS, seed=7, **kwargs)
    assert first != generate(model, PROMPTS, seed=8, **kwargs)
    # top-k 1 and a nucleus that holds one token are greedy whatever the temperature
    greedy = generate(model, PROMPTS, max_new_tokens=NEW)
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_k=1) == greedy
    assert generate(model, PROMPTS, max_new_tokens=NEW, temperature=2.0, top_p=1e-6) == greedy


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        seen.add(int(next_tokens(logits, 1.0, None, 0.75, gen)))
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are never drawn


def test_too_long_and_bad_settings_are_refused_in_one_line(llama):
    model = llama
    positions = model.args.max_seq_len
    with pytest.raises(UserError, match=r"--max-new-tokens=\d+: .*positions"):
        generate(model, [[1] * 10], max_new_tokens=positions)
    for kwargs, flag in (
        (dict(temperature=-1.0), "--temperature"),
        (dict(top_k=0, temperature=1.0), "--top-k"),
        (dict(top_p=1.5, temperature=1.0), "--top-p"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
    ):
        with pytest.raises(UserError, match=flag):
            generate(model, [[1, 2]], **{"max_new_tokens": 4, **kwargs})


def test_a_too_long_input_names_the_positions_not_a_shape(llama):
    model = llama
    positions = model.args.max_seq_len
    with pytest.raises(
        ValueError, match=f"{positions + 1} positions but this model has {positions}"
    ):
        model(torch.zeros(1, positions + 1, dtype=torch.long))
