"""``CrossRecModel``: a decoder-only sequential recommender on a ``transformers`` Llama backbone.

Input: left-padded item-ID histories (0 = padding). Every position predicts the next item (causal
loss at every position, SASRec/HSTU style); scores are dot products with the item embedding table,
so the output layer is the input table (tied) and new items need one row, not two; with
``item_bias`` each item's score also gets a learned offset (its popularity, in effect).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import LlamaModel, PreTrainedModel
from transformers.utils import ModelOutput

from .config import CrossRecConfig
from .losses import full_softmax, sampled_softmax


@dataclass
class CrossRecOutput(ModelOutput):
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None   # (B, L, H) final hidden states
    num_tokens: int | None = None


class ItemBias(nn.Module):
    """One score offset per item (index 0 = padding), zero at start. A module of its own so a PEFT
    adapter can retrain it (``modules_to_save``) and ZeRO-3 gathers it in its own forward."""

    def __init__(self, num_rows: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_rows))

    def forward(self) -> torch.Tensor:
        return self.weight


class CrossRecModel(PreTrainedModel):
    """Decoder-only next-item model: item (+ domain) embeddings -> Llama decoder -> scores over items.

    ``model(input_ids, labels=...)`` returns a :class:`CrossRecOutput` with the mean next-item loss
    over every labelled position (``labels`` 0 = no loss); ``model(input_ids, return_scores=True)``
    or :meth:`score` returns ``(B, num_items + 1)`` scores for the item after each history. Saved
    and loaded with the usual ``save_pretrained`` / ``from_pretrained`` (safetensors).
    """
    config_class = CrossRecConfig
    base_model_prefix = "crossrec"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: CrossRecConfig):
        super().__init__(config)
        self.item_embeddings = nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0)
        self.domain_embeddings = (nn.Embedding(max(config.num_domains, 1), config.hidden_size)
                                  if config.use_domain_embedding else None)
        self.item_bias = ItemBias(config.num_items + 1) if getattr(config, "item_bias", False) else None
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.backbone = LlamaModel(config.backbone_config())
        del self.backbone.embed_tokens  # inputs come in as embeddings; an unused table would be dead weight
        self.post_init()
        # Every weight's initial value is a function of (seed, its module's name) alone, not of the
        # order transformers happens to initialise modules in: so a model built partitioned under
        # ZeRO-3 (zero.Init, then initialised one gathered module at a time) equals a plain one.
        self._init_seed = torch.initial_seed()
        self._module_names = {id(m): name for name, m in self.named_modules()}
        for module in self.modules():
            self._init_weights(module)

    def _init_weights(self, module):
        weight = getattr(module, "weight", None)
        names = getattr(self, "_module_names", None)
        if names is None or (weight is not None and (weight.numel() == 0 or weight.is_meta)):
            return   # before construction ends, a ZeRO-3 shard placeholder (initialised gathered later) or meta
        gen = torch.Generator(device="cpu").manual_seed(
            (self._init_seed * 1_000_003 + zlib.crc32(names.get(id(module), "").encode())) % (2 ** 63))
        std = self.config.initializer_range

        def normal(t: torch.Tensor) -> None:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(std).to(t.dtype))

        with torch.no_grad():
            if isinstance(module, nn.Linear):
                normal(module.weight)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                normal(module.weight)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif weight is not None and module.__class__.__name__.endswith("RMSNorm"):
                module.weight.fill_(1.0)
            elif isinstance(module, ItemBias):
                module.weight.zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.item_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.item_embeddings = value

    def encode(self, input_ids: torch.Tensor, domain_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden state at every position, (B, L, H)."""
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        x = self.item_embeddings(input_ids)
        if self.domain_embeddings is not None and domain_ids is not None:
            x = x + self.domain_embeddings(domain_ids)[:, None, :]
        x = self.embedding_dropout(x)
        return self.backbone(inputs_embeds=x, attention_mask=attention_mask).last_hidden_state

    def item_weight(self) -> torch.Tensor:
        """The item table as scores see it. Under a PEFT trainable-tokens adapter (rows for items new
        to a target domain) that is the base table with the adapter's rows swapped in, so input and
        output sides stay tied."""
        emb = self.item_embeddings
        if hasattr(emb, "lora_embedding_A"):
            # PEFT LoRA on the item table: the same low-rank delta on the output side, so scores see
            # the adapted items too (the table is both the input and the output layer).
            weight = emb.get_base_layer().weight
            if emb.disable_adapters or emb.merged:
                return weight
            for name in emb.active_adapters:
                if name in emb.lora_embedding_A:
                    weight = weight + emb.get_delta_weight(name)
            return weight
        tokens = getattr(emb, "token_adapter", None)
        if tokens is None:
            return emb.weight
        active = [a for a in tokens.active_adapters if a in tokens.token_indices]
        if tokens.disable_adapters or tokens.merged or not active:
            return tokens.base_layer.weight
        return tokens.get_merged_weights(active)

    def output_bias(self) -> torch.Tensor | None:
        """The per-item score offsets (N+1,), or None for a model without them (``item_bias``)."""
        return None if self.item_bias is None else self.item_bias()

    def item_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over every item for hidden states (..., H): dot products with the item table, plus
        each item's offset when the model has one."""
        scores = hidden @ self.item_weight().t()
        bias = self.output_bias()
        return scores if bias is None else scores + bias

    def tied_parameters(self) -> list[nn.Parameter]:
        """Parameters used outside their own module's forward (the output side of tied scores).
        Under ZeRO-3 the engine registers them as external parameters of this module."""
        emb = self.item_embeddings
        if hasattr(emb, "lora_embedding_A"):
            return [emb.get_base_layer().weight, *emb.lora_embedding_A.values(), *emb.lora_embedding_B.values()]
        tokens = getattr(emb, "token_adapter", None)
        if tokens is None:
            return [self.item_embeddings.weight]
        return [tokens.base_layer.weight, *tokens.trainable_tokens_delta.values()]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                domain_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                return_scores: bool = False, score_last: int = 0, **_) -> CrossRecOutput | torch.Tensor:
        """Loss when ``labels`` are given; with ``return_scores`` the next-item scores (B, N+1)
        after each history (a forward pass, so ZeRO-3 gathers parameters as usual). With
        ``score_last`` = k > 1 as well: scores (B, k, N+1) after each of the last k positions of each
        row, i.e. after each of its last k prefixes (one causal pass scores them all; used to rank a
        user's several validation targets at once)."""
        hidden = self.encode(input_ids, domain_ids, attention_mask)
        if return_scores:
            return self.item_scores(hidden[:, -score_last:] if score_last > 1 else hidden[:, -1])
        if labels is None:
            return CrossRecOutput(hidden_states=hidden)
        mask = labels > 0
        h, y = hidden[mask], labels[mask]
        if self.config.loss == "sampled":
            loss = sampled_softmax(h, self.item_weight(), y, self.config.num_negatives, bias=self.output_bias())
        else:
            loss = full_softmax(h, self.item_weight(), y, bias=self.output_bias())
        return CrossRecOutput(loss=loss, hidden_states=hidden, num_tokens=int(mask.sum()))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, domain_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Scores over all items (B, N+1) for the next item after each left-padded history."""
        return self(input_ids, domain_ids=domain_ids, return_scores=True)
