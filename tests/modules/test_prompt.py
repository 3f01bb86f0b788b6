"""Prompt tuning: init modes, prepend with mask/label handling, PEFT layout, end-to-end on the BERT encoder."""
import pytest
import torch
from torch import nn

from fastpeft.modules.prompt import PromptTuning


def vocab(v=30, d=8):
    return nn.Embedding(v, d)


def test_random_init_shape_and_layout():
    pt = PromptTuning(5, 8)
    assert isinstance(pt.embedding, nn.Embedding)
    assert pt.embedding.weight.shape == (5, 8)  # PEFT's prompt_embeddings (k, D)
    assert pt().shape == (5, 8)
    assert pt(3).shape == (3, 5, 8)
    assert pt(3).data_ptr() == pt.embedding.weight.data_ptr()  # expanded view, not a copy
    assert [n for n, _ in pt.named_parameters()] == ["embedding.weight"]


@pytest.mark.parametrize("ids,expected", [
    ([4, 7], [4, 7, 4, 7, 4]),          # repeated, then truncated to k
    ([1, 2, 3, 4, 5, 6, 9], [1, 2, 3, 4, 5]),  # truncated
    (torch.tensor([[11], [12]]), [11, 12, 11, 12, 11]),
], ids=["repeat", "truncate", "tensor"])
def test_text_init_copies_word_embeddings(ids, expected):
    we = vocab()
    pt = PromptTuning(5, 8, init="text", word_embeddings=we, init_token_ids=ids)
    torch.testing.assert_close(pt.embedding.weight.detach(), we.weight.detach()[expected], rtol=0, atol=0)
    # a copy, not a view: training the prompt leaves the vocabulary alone
    assert pt.embedding.weight.data_ptr() != we.weight.data_ptr()
    with torch.no_grad():
        pt.embedding.weight.add_(1.0)
    assert not torch.equal(pt.embedding.weight[0], we.weight[expected[0]])


def test_vocab_init_samples_rows():
    we = vocab(v=50)
    torch.manual_seed(3)
    pt = PromptTuning(6, 8, init="vocab", word_embeddings=we.weight)
    w = pt.embedding.weight.detach()
    for row in w:  # every row is some vocabulary row
        assert (we.weight.detach() == row).all(1).any()
    torch.manual_seed(3)  # same draw order as PEFT: the table is built (and initialised) first
    nn.Embedding(6, 8)
    ids = torch.randint(0, 50, (6,))
    torch.testing.assert_close(w, we.weight.detach()[ids], rtol=0, atol=0)


def test_init_errors():
    with pytest.raises(ValueError, match="word_embeddings"):
        PromptTuning(4, 8, init="text", init_token_ids=[1])
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(4, 8, init="text", word_embeddings=vocab())
    with pytest.raises(ValueError, match="init_token_ids"):
        PromptTuning(4, 8, init="text", word_embeddings=vocab(v=10), init_token_ids=[10])
    with pytest.raises(ValueError, match="word_embeddings"):
        PromptTuning(4, 8, init="vocab", word_embeddings=vocab(d=6))
    with pytest.raises(ValueError, match="init"):
        PromptTuning(4, 8, init="xavier")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuning(0, 8)


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float32], ids=["long", "bool", "float"])
def test_prepend_mask_and_labels(mask_dtype):
    pt = PromptTuning(3, 8)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).to(mask_dtype)
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, -100, -100]])
    out = pt.prepend(x, mask, labels)
    assert out.inputs_embeds.shape == (2, 7, 8)
    torch.testing.assert_close(out.inputs_embeds[:, :3], pt.embedding.weight.detach().expand(2, -1, -1))
    torch.testing.assert_close(out.inputs_embeds[:, 3:], x)
    assert out.attention_mask.dtype == mask_dtype
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]
    assert out.labels.tolist() == [[-100] * 3 + [5, 6, 7, -100], [-100] * 3 + [1, 2, -100, -100]]
    assert pt.prepend_ids(torch.zeros(2, 4, dtype=torch.long), 0).shape == (2, 7)  # e.g. token_type_ids


def test_prepend_optional_parts_dtype_and_grad():
    pt = PromptTuning(2, 8)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    emb, mask, labels = pt.prepend(x)
    assert mask is None and labels is None
    assert emb.dtype == torch.float64  # the prompt follows the inputs' dtype, as in PEFT
    emb.sum().backward()
    torch.testing.assert_close(pt.embedding.weight.grad, torch.full((2, 8), 3.0))  # summed over the batch


def test_prepend_shape_errors():
    pt = PromptTuning(2, 8)
    with pytest.raises(ValueError, match="inputs_embeds"):
        pt.prepend(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="attention_mask"):
        pt.prepend(torch.randn(2, 5, 8), torch.ones(2, 4))
    with pytest.raises(ValueError, match="labels"):
        pt.prepend(torch.randn(2, 5, 8), None, torch.ones(5, 2, dtype=torch.long))


def test_prompt_tuning_on_bert_masks_padding_and_trains():
    from fastpeft.models import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig.tiny(vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg).eval().requires_grad_(False)
    we = model.bert.embeddings.word_embeddings
    pt = PromptTuning(4, cfg.hidden_size, init="text", word_embeddings=we, init_token_ids=[7, 8])
    ids = torch.tensor([[2, 5, 9, 0, 0], [3, 4, 6, 8, 1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    emb, m, _ = pt.prepend(we(ids), mask)
    logits = model(inputs_embeds=emb, attention_mask=m)
    # padding is masked: changing the padded ids changes nothing
    ids2 = ids.clone()
    ids2[0, 3:] = 17
    emb2, m2, _ = pt.prepend(we(ids2), mask)
    torch.testing.assert_close(model(inputs_embeds=emb2, attention_mask=m2), logits)
    logits.sum().backward()
    assert pt.embedding.weight.grad is not None and pt.embedding.weight.grad.abs().sum() > 0
