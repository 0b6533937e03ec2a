"""IGNORE_INDEX: the label of a token that carries no loss (prompt tokens, padding, the last
token of a document). -100 is PyTorch's `cross_entropy` default, so Hugging Face collators,
TRL and Liger mark the same tokens the same way; every collator, kernel and loss here reads it
from this one place."""

IGNORE_INDEX = -100
