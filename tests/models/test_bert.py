"""fastpeft.models.BertModel: HF BERT's names, state dicts and outputs; inputs_embeds; prefix_kv."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
import transformers

from fastpeft.models import BertConfig, BertForSequenceClassification, BertModel


def hf_config(**kw):
    return transformers.BertConfig(**{**dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, num_labels=3), **kw})


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    return ids, mask, torch.randint(0, 2, (3, 7), generator=g)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_matches_hf_bert_model(act):
    torch.manual_seed(0)
    cfg = hf_config(hidden_act=act)
    hf = transformers.BertModel(cfg).eval()
    ours = BertModel(BertConfig.from_hf(cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # identical keys and shapes
    ids, mask, tt = batch()
    want = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    got = ours(ids, attention_mask=mask, token_type_ids=tt)
    keep = mask.bool()  # padded positions are not defined the same way everywhere
    torch.testing.assert_close(got.last_hidden_state[keep], want.last_hidden_state[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, rtol=1e-5, atol=1e-5)


def test_matches_hf_sequence_classification_and_inputs_embeds():
    torch.manual_seed(0)
    cfg = hf_config()
    hf = transformers.BertForSequenceClassification(cfg).eval()
    ours = BertForSequenceClassification(BertConfig.from_hf(cfg)).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    ids, mask, tt = batch()
    want = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
    torch.testing.assert_close(ours(ids, mask, tt), want, rtol=1e-5, atol=1e-5)
    emb = ours.bert.embeddings.word_embeddings(ids)
    torch.testing.assert_close(ours(inputs_embeds=emb, attention_mask=mask, token_type_ids=tt), want,
                               rtol=1e-5, atol=1e-5)


def test_presets_and_bert_base_size():
    t = BertConfig.tiny()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (128, 2, 2, 512)
    with torch.device("meta"):
        m = BertModel(BertConfig.base())
    assert sum(p.numel() for p in m.parameters()) == 109_482_240  # bert-base-uncased
    assert m.pooler is not None and BertModel(BertConfig.tiny(vocab_size=50), add_pooling_layer=False).pooler is None


def test_hf_module_names():
    names = {n for n, _ in BertModel(BertConfig.tiny(vocab_size=50, num_hidden_layers=1)).named_modules()}
    for n in ("embeddings.word_embeddings", "embeddings.LayerNorm", "encoder.layer.0.attention.self.query",
              "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
              "encoder.layer.0.attention.output.dense", "encoder.layer.0.attention.output.LayerNorm",
              "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
              "encoder.layer.0.output.LayerNorm", "pooler.dense"):
        assert n in names


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = BertModel(BertConfig.tiny(vocab_size=50))
    ids = torch.randint(0, 50, (2, 5))
    m.eval()
    torch.testing.assert_close(m(ids).last_hidden_state, m(ids).last_hidden_state)
    m.train()
    assert not torch.equal(m(ids).last_hidden_state, m(ids).last_hidden_state)


@pytest.mark.skipif(importlib.util.find_spec("fastpeft.ops.prefix_attention") is None,
                    reason="fastpeft.ops.prefix_attention not present in this checkout")
def test_prefix_kv_equals_attention_over_concatenated_keys():
    torch.manual_seed(0)
    m = BertModel(BertConfig.tiny(vocab_size=50, hidden_size=32, num_attention_heads=4)).double().eval()
    ids, mask, _ = batch()
    ids = ids % 50
    prefix = [tuple(torch.randn(2, 1, 4, 2, 8, dtype=torch.float64).unbind(0)) for _ in range(2)]
    got = m(ids, attention_mask=mask, prefix_kv=prefix).last_hidden_state

    # reference: the same model with keys/values [prefix ; main] built explicitly
    def ref_self_attn(sa, hidden, add_mask, pk, pv):
        b, s, _ = hidden.shape
        q, k, v = (sa._heads(f(hidden)) for f in (sa.query, sa.key, sa.value))
        k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
        v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
        full = torch.cat([torch.zeros(b, 1, 1, pk.shape[2], dtype=hidden.dtype), add_mask], -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full).transpose(1, 2).reshape(b, s, -1)

    add_mask = ((1.0 - mask.double()) * torch.finfo(torch.float64).min)[:, None, None, :]
    h = m.embeddings(ids)
    for lyr, (pk, pv) in zip(m.encoder.layer, prefix):
        a = lyr.attention.output(ref_self_attn(lyr.attention.self, h, add_mask, pk, pv), h)
        h = lyr.output(lyr.intermediate(a), a)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], h[keep])


def test_bad_input_raises():
    m = BertModel(BertConfig.tiny(vocab_size=50))
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        m()
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        m(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="prefix_kv: expected one entry per layer"):
        m(ids, prefix_kv=[None])
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig(hidden_size=30, num_attention_heads=4)
