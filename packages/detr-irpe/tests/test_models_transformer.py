"""The encoder-decoder against a naive re-implementation of the original's layers
(attention with iRPE written out term by term, bucket ids from the piecewise function)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from detr_irpe.models.transformer import Transformer

D_MODEL, NHEAD, FFN = 16, 2, 24


# ---- naive iRPE (product method) -----------------------------------------------------------


def naive_piecewise(x: int, ratio: float) -> int:
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    if abs(x) <= alpha:
        return x
    t = alpha + math.log(abs(x) / alpha) / math.log(gamma / alpha) * (beta - alpha)
    level = min(round(t), beta)  # Python round is half-even, like torch.round
    return int(math.copysign(level, x))  # int() truncates toward zero


def naive_product_buckets(height: int, width: int, ratio: float) -> torch.Tensor:
    beta_int = int(2 * ratio)
    size = 2 * beta_int + 1
    n = height * width
    ids = torch.zeros(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            dr = i // width - j // width
            dc = i % width - j % width
            ids[i, j] = (naive_piecewise(dr, ratio) + beta_int) * size + (
                naive_piecewise(dc, ratio) + beta_int
            )
    return ids


def test_naive_buckets_reproduce_the_original_example() -> None:
    # The original's product ids for ratio 2.0 on a 3x3 grid, first row (query 0, keys 0..8).
    assert naive_product_buckets(3, 3, 2.0)[0].tolist() == [40, 39, 38, 31, 30, 29, 22, 21, 20]


def naive_attention(attn, query, key, value, key_padding_mask=None, buckets=None):
    """The original's iRPE attention forward, step by step, for (L, N, E) inputs."""
    L, N, E = query.shape
    nh = attn.num_heads
    D = E // nh
    s = float(D) ** -0.5
    W, b = attn.in_proj_weight, attn.in_proj_bias
    q = (query @ W[:E].T + b[:E]) * s
    k = key @ W[E : 2 * E].T + b[E : 2 * E]
    v = value @ W[2 * E :].T + b[2 * E :]
    out = torch.zeros(L, N, E, dtype=query.dtype)
    for n in range(N):
        for h in range(nh):
            qh = q[:, n, h * D : (h + 1) * D]
            kh = k[:, n, h * D : (h + 1) * D]
            vh = v[:, n, h * D : (h + 1) * D]
            logits = qh @ kh.T
            for name in ("rpe_k", "rpe_q"):
                module = getattr(attn, name)
                if module is None:
                    continue
                hm = 0 if module.num_heads == 1 else h
                if module.mode == "contextual":
                    table = module.lookup_table_weight[hm]  # (D, K)
                    if name == "rpe_k":
                        # R_k[i, j] = sum_d qs[i, d] W_k[d, bkt(i, j)]
                        term = torch.stack([qh[i] @ table[:, buckets[i]] for i in range(L)])
                    else:
                        # R_q[i, j] = sum_d ks[j, d] W_q[d, bkt(j, i)]
                        term = torch.stack([(s * kh[j]) @ table[:, buckets[j]] for j in range(L)]).T
                else:
                    bias = module.lookup_table_bias[hm]
                    term = bias[buckets] if name == "rpe_k" else bias[buckets].T
                logits = logits + term
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[n][None, :], float("-inf"))
            probs = logits.softmax(-1)
            o = probs @ vh
            if attn.rpe_v is not None:
                hm = 0 if attn.rpe_v.num_heads == 1 else h
                table = attn.rpe_v.lookup_table_weight[hm]  # (K, D)
                o = o + torch.stack([probs[i] @ table[buckets[i]] for i in range(L)])
            out[:, n, h * D : (h + 1) * D] = o
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def naive_ffn(layer, x):
    return F.linear(
        F.relu(F.linear(x, layer.linear1.weight, layer.linear1.bias)),
        layer.linear2.weight,
        layer.linear2.bias,
    )


def ln(norm, x):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, 1e-5)


def naive_encoder_layer(layer, src, pos, mask, buckets, pre_norm: bool):
    if pre_norm:
        t = ln(layer.norm1, src)
        src = src + naive_attention(layer.self_attn, t + pos, t + pos, t, mask, buckets)
        return src + naive_ffn(layer, ln(layer.norm2, src))
    src = ln(
        layer.norm1,
        src + naive_attention(layer.self_attn, src + pos, src + pos, src, mask, buckets),
    )
    return ln(layer.norm2, src + naive_ffn(layer, src))


def naive_decoder_layer(layer, tgt, memory, pos, query_pos, mask, pre_norm: bool):
    def mha(module, q, k, v, kpm=None):
        return naive_attention(_AsRPE(module), q, k, v, kpm)

    if pre_norm:
        t = ln(layer.norm1, tgt)
        tgt = tgt + mha(layer.self_attn, t + query_pos, t + query_pos, t)
        t = ln(layer.norm2, tgt)
        tgt = tgt + mha(layer.multihead_attn, t + query_pos, memory + pos, memory, mask)
        return tgt + naive_ffn(layer, ln(layer.norm3, tgt))
    tgt = ln(layer.norm1, tgt + mha(layer.self_attn, tgt + query_pos, tgt + query_pos, tgt))
    tgt = ln(
        layer.norm2, tgt + mha(layer.multihead_attn, tgt + query_pos, memory + pos, memory, mask)
    )
    return ln(layer.norm3, tgt + naive_ffn(layer, tgt))


class _AsRPE:
    """nn.MultiheadAttention seen through the attributes naive_attention reads (no iRPE)."""

    def __init__(self, module: torch.nn.MultiheadAttention) -> None:
        self.num_heads = module.num_heads
        self.in_proj_weight = module.in_proj_weight
        self.in_proj_bias = module.in_proj_bias
        self.out_proj = module.out_proj
        self.rpe_q = self.rpe_k = self.rpe_v = None


def naive_transformer(model: Transformer, src, mask, query_embed, pos_embed, ratio, pre_norm):
    n, c, h, w = src.shape
    x = src.flatten(2).permute(2, 0, 1)
    pos = pos_embed.flatten(2).permute(2, 0, 1)
    kpm = mask.flatten(1)
    buckets = naive_product_buckets(h, w, ratio) if ratio else None
    for layer in model.encoder.layers:
        x = naive_encoder_layer(layer, x, pos, kpm, buckets, pre_norm)
    if pre_norm:
        x = ln(model.encoder.norm, x)
    memory = x
    query_pos = query_embed.unsqueeze(1).repeat(1, n, 1)
    tgt = torch.zeros_like(query_pos)
    outputs = []
    for layer in model.decoder.layers:
        tgt = naive_decoder_layer(layer, tgt, memory, pos, query_pos, kpm, pre_norm)
        outputs.append(ln(model.decoder.norm, tgt))
    return torch.stack(outputs).transpose(1, 2), memory.permute(1, 2, 0).reshape(n, c, h, w)


CONFIGS = [
    ("rpe-2.0-product-ctx-1-k", 2.0),
    ("rpe-1.9-product-ctx-0-qkv", 1.9),
    ("rpe-2.0-product-bias-0-qk", 2.0),
    ("", None),
]


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize(("enc_rpe2d", "ratio"), CONFIGS)
def test_transformer_matches_naive(enc_rpe2d: str, ratio: float | None, pre_norm: bool) -> None:
    torch.manual_seed(0)
    model = (
        Transformer(
            d_model=D_MODEL,
            nhead=NHEAD,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=FFN,
            dropout=0.1,
            normalize_before=pre_norm,
            return_intermediate_dec=True,
            enc_rpe2d=enc_rpe2d,
        )
        .double()
        .eval()
    )
    with torch.no_grad():  # give the 1-D parameters non-trivial values too
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    h, w = 4, 5
    src = torch.randn(2, D_MODEL, h, w, dtype=torch.float64)
    pos = torch.randn(2, D_MODEL, h, w, dtype=torch.float64)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, 3:, :] = True  # second image: 3 valid rows, 4 valid columns
    mask[1, :, 4:] = True
    queries = torch.randn(3, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        hs, memory = model(src, mask, queries, pos)
        expected_hs, expected_memory = naive_transformer(
            model, src, mask, queries, pos, ratio, pre_norm
        )
    assert hs.shape == (2, 2, 3, D_MODEL) and memory.shape == (2, D_MODEL, h, w)
    torch.testing.assert_close(memory, expected_memory, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(hs, expected_hs, rtol=1e-9, atol=1e-9)


def test_encoder_state_dict_order_and_pre_norm_keys() -> None:
    post = Transformer(D_MODEL, NHEAD, 1, 1, FFN, enc_rpe2d="rpe-2.0-product-ctx-0-qkv")
    keys = [k for k in post.state_dict() if k.startswith("encoder.layers.0.")]
    assert [k[len("encoder.layers.0.") :] for k in keys] == [
        "self_attn.in_proj_weight",
        "self_attn.in_proj_bias",
        "self_attn.out_proj.weight",
        "self_attn.out_proj.bias",
        "self_attn.rpe_q.lookup_table_weight",
        "self_attn.rpe_k.lookup_table_weight",
        "self_attn.rpe_v.lookup_table_weight",
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
    ]
    assert not any(k.startswith("encoder.norm") for k in post.state_dict())
    pre = Transformer(D_MODEL, NHEAD, 1, 1, FFN, normalize_before=True)
    assert "encoder.norm.weight" in pre.state_dict()
    assert list(pre.state_dict())[-2:] == ["decoder.norm.weight", "decoder.norm.bias"]


def test_irpe_tables_get_their_own_xavier_values() -> None:
    torch.manual_seed(0)
    model = Transformer(256, 8, 3, 1, 64, enc_rpe2d="rpe-2.0-product-ctx-1-k")
    tables = [layer.self_attn.rpe_k.lookup_table_weight.detach() for layer in model.encoder.layers]
    bound = math.sqrt(6 / (32 * 81 + 1 * 81))  # fan_in D*K, fan_out Hm*K: 0.04738
    for table in tables:
        assert table.shape == (1, 32, 81)
        assert float(table.abs().max()) <= bound
        assert float(table.abs().max()) > 0.9 * bound  # filled, not left at zero
    assert not torch.equal(tables[0], tables[1]) and not torch.equal(tables[1], tables[2])


def test_seeded_construction_is_reproducible() -> None:
    def build() -> dict:
        torch.manual_seed(7)
        return Transformer(
            D_MODEL, NHEAD, 2, 2, FFN, enc_rpe2d="rpe-2.0-product-ctx-1-k"
        ).state_dict()

    first, second = build(), build()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_configuration_errors() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Transformer(10, 3, 1, 1, 8)
    with pytest.raises(ValueError):
        Transformer(D_MODEL, NHEAD, 1, 1, FFN, enc_rpe2d="rpe-2.0-foo-ctx-1-k")
    with pytest.raises(ValueError, match="unknown activation"):
        Transformer(D_MODEL, NHEAD, 1, 1, FFN, activation="swish")
