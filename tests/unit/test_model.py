"""The Transformer: attention maths, eval determinism, init, FLOPs and learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmcore.config import ModelConfig, preset
from lmcore.model import CausalSelfAttention, Transformer

pytestmark = pytest.mark.unit


@pytest.fixture
def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny")).eval()


def test_attention_matches_explicit_softmax_with_inverse_sqrt_head_dim_scale() -> None:
    torch.manual_seed(0)
    cfg = preset("tiny")
    attn = CausalSelfAttention(cfg, layer=0).eval()
    x = torch.randn(2, 10, cfg.n_embd)
    q, k, v = attn.qkv(x).split(cfg.n_embd, dim=2)
    shape = (2, 10, cfg.n_head, cfg.head_dim)
    q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(10, 10, dtype=torch.bool), 1), -math.inf)
    expected = attn.proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 10, cfg.n_embd))
    torch.testing.assert_close(attn(x, None, None, None), expected)


def test_future_tokens_do_not_change_earlier_logits(tiny: Transformer) -> None:
    idx = torch.randint(0, 500, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 500
    a, _ = tiny(idx)
    b, _ = tiny(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_logits_at_one_position_per_row_match_the_full_output(tiny: Transformer) -> None:
    idx = torch.randint(0, tiny.config.vocab_size, (3, 10))
    at = torch.tensor([9, 0, 4])
    with torch.no_grad():
        full, _ = tiny(idx)
        picked, _ = tiny(idx, logits_at=at)
    assert picked.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at])
    with pytest.raises(ValueError, match="logits_at"):
        tiny(idx, idx, logits_at=at)


def test_dropout_is_off_in_eval_and_on_in_train() -> None:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", dropout=0.5))
    idx = torch.randint(0, 500, (2, 16))
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


def test_head_is_tied_to_the_token_embedding(tiny: Transformer) -> None:
    assert tiny.head.weight.data_ptr() == tiny.tok_emb.weight.data_ptr()
    untied = Transformer(preset("tiny", tie_embeddings=False))
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_an_uninitialized_model_has_the_same_tensors_and_draws_no_random_numbers(
    tied: bool,
) -> None:
    config = preset("tiny", tie_embeddings=tied)
    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    model = Transformer.uninitialized(config, dtype=torch.bfloat16)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)
    reference = Transformer(config).state_dict()
    assert {k: (v.shape, torch.bfloat16) for k, v in reference.items()} == {
        k: (v.shape, v.dtype) for k, v in model.state_dict().items()
    }
    assert (model.head.weight is model.tok_emb.weight) == tied
    # Only the random init is skipped: what a constructor sets otherwise is still there.
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_residual_projections_get_scaled_init() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, n_layer=8, n_head=4, n_embd=256, block_size=64)
    model = Transformer(cfg)
    expected = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_gelu_and_swiglu_mlps_have_similar_sizes() -> None:
    swiglu = Transformer(preset("small")).num_params()
    gelu = Transformer(preset("small", mlp="gelu")).num_params()
    assert abs(swiglu - gelu) / gelu < 0.02


def test_flops_per_token_follows_6n_plus_attention(tiny: Transformer) -> None:
    cfg = tiny.config
    n = tiny.num_params() + cfg.padded_vocab_size * cfg.n_embd
    assert tiny.flops_per_token(64) == 6 * n + 12 * cfg.n_layer * cfg.n_embd * 64


def test_sequence_longer_than_block_size_is_refused(tiny: Transformer) -> None:
    with pytest.raises(ValueError, match="block_size"):
        tiny(torch.zeros(1, tiny.config.block_size + 1, dtype=torch.long))


def test_tiny_model_overfits_a_short_text() -> None:
    """Byte-level ids of one sentence: 300 AdamW steps must take the loss below 0.1."""
    torch.manual_seed(0)
    text = b"To be, or not to be, that is the question: whether 'tis nobler in the mind."
    ids = torch.tensor(list(text), dtype=torch.long)[None]
    model = Transformer(ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_embd=64, block_size=128))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
