"""Reference models, written plainly, to exercise and benchmark every method without downloads.

* :class:`ViT` / :class:`ViTConfig` (timm-style names; tiny/small/base presets),
* :class:`BertModel` / :class:`BertForSequenceClassification` / :class:`BertConfig`
  (Hugging Face BERT's module names and state-dict keys),
* :func:`interpolate_pos_embed` for higher-resolution fine-tuning.
"""
from fastpeft.models.bert import BertConfig, BertForSequenceClassification, BertModel, BertOutput
from fastpeft.models.pos_embed import grid_size, interpolate_pos_embed, resize_pos_embed
from fastpeft.models.vit import Attention, Block, Mlp, PatchEmbed, ViT, ViTConfig

__all__ = ["ViT", "ViTConfig", "Block", "Attention", "Mlp", "PatchEmbed",
           "BertConfig", "BertModel", "BertForSequenceClassification", "BertOutput",
           "interpolate_pos_embed", "resize_pos_embed", "grid_size"]
