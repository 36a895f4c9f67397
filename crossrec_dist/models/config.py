"""``CrossRecConfig``: a ``transformers`` config whose backbone part is a Llama config."""
from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig


class CrossRecConfig(PretrainedConfig):
    """Item-ID sequence model: item (+ domain) embeddings -> Llama decoder -> scores tied to items.

    ``num_items`` excludes padding (index 0); the embedding table has ``num_items + 1`` rows.
    """

    model_type = "crossrec"

    def __init__(self, num_items: int = 1000, num_domains: int = 1, use_domain_embedding: bool = False,
                 hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, num_kv_heads: int | None = None,
                 intermediate_size: int | None = None, max_len: int = 50, embedding_dropout: float = 0.2,
                 attention_dropout: float = 0.2, rms_norm_eps: float = 1e-6, rope_theta: float = 10000.0,
                 initializer_range: float = 0.02, loss: str = "full", num_negatives: int = 1024,
                 domain_names: list[str] | None = None, pretrain_domains: list[str] | None = None,
                 item_bias: bool = False, **kwargs):
        self.num_items = num_items
        self.num_domains = num_domains
        self.use_domain_embedding = use_domain_embedding
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_len = max_len
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        if loss not in ("full", "sampled"):
            raise ValueError(f"loss must be 'full' or 'sampled', not {loss!r}")
        self.loss = loss
        self.num_negatives = num_negatives
        self.domain_names = list(domain_names or [])
        self.pretrain_domains = list(pretrain_domains) if pretrain_domains else list(self.domain_names)
        # One learned score offset per item (zero at start): how often an item is chosen regardless of
        # the history. Popularity is what shifts most between platforms and eras, and an adapter can
        # retrain this vector (N + 1 numbers) without touching the item table.
        self.item_bias = bool(item_bias)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def backbone_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=1,  # unused: inputs are item embeddings, built outside the backbone
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=max(self.max_len, 8),
            rms_norm_eps=self.rms_norm_eps, attention_dropout=self.attention_dropout,
            initializer_range=self.initializer_range, use_cache=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            pad_token_id=None, bos_token_id=None, eos_token_id=None,
        )
