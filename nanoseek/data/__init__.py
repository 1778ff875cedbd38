"""Data: tokenizer training, document sources, token shards and packing."""
