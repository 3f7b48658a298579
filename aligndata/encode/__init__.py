"""Stage 2: canonical records to token ids and loss masks (tokenizer, chat template, mask, length policy)."""
