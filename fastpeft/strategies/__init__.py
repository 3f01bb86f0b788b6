"""Classic (non-additive) fine-tuning strategies.

* what trains: :func:`full_finetune`, :func:`partial_k`, :func:`bitfit`, :func:`freeze`,
  :func:`unfreeze`, :func:`freeze_blocks`, :class:`ProgressiveUnfreezer`, :func:`num_trainable`
* heads and probing: :func:`replace_head`, :class:`MLPHead`, :class:`LinearProbe`,
  :class:`FeatureCache` (in memory or on disk), :func:`pool_tokens` (cls / mean / last token)
* multi-task: :class:`MultiTaskHeads` (one backbone, a head per task), :class:`MultiTaskLoss`
* few-shot: :class:`PrototypicalHead`, :func:`prototypical_loss`, :func:`sample_episode` (N-way K-shot)
* learning rates: :func:`layerwise_lr_groups`, :func:`discriminative_lr_groups`, :class:`WarmupCosine`
* continual fine-tuning: :class:`EWC`
* higher resolution: :func:`interpolate_pos_embed` (and ``ViT.set_image_size``)
"""
from fastpeft.models.pos_embed import interpolate_pos_embed
from fastpeft.strategies._layers import find_blocks, find_head, param_layer_ids
from fastpeft.strategies.ewc import EWC
from fastpeft.strategies.freezing import (ProgressiveUnfreezer, bitfit, freeze, freeze_blocks, full_finetune,
                                          num_trainable, partial_k, unfreeze)
from fastpeft.strategies.heads import MLPHead, replace_head
from fastpeft.strategies.lr import NO_WEIGHT_DECAY, WarmupCosine, discriminative_lr_groups, layerwise_lr_groups
from fastpeft.strategies.fewshot import (Episode, PrototypicalHead, prototypes, prototypical_logits, prototypical_loss,
                                         sample_episode)
from fastpeft.strategies.multitask import MultiTaskHeads, MultiTaskLoss
from fastpeft.strategies.probing import FeatureCache, LinearProbe, pool_tokens, tokens_of

__all__ = [
    "full_finetune", "partial_k", "bitfit", "freeze", "unfreeze", "freeze_blocks", "ProgressiveUnfreezer",
    "num_trainable", "replace_head", "MLPHead", "LinearProbe", "FeatureCache", "pool_tokens",
    "layerwise_lr_groups", "discriminative_lr_groups", "WarmupCosine", "NO_WEIGHT_DECAY", "EWC",
    "interpolate_pos_embed", "find_blocks", "find_head", "param_layer_ids", "tokens_of", "MultiTaskHeads",
    "MultiTaskLoss", "PrototypicalHead", "prototypes", "prototypical_logits", "prototypical_loss", "sample_episode",
    "Episode",
]
