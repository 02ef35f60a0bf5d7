"""Data: corpus files, tokenizer training, token shards and the packed, resumable loader."""
