"""Helpers shared by tests: a tiny random BERT the text encoder loads in a fraction of a second."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from rec_models.text.encoder import default_text_model_path

# Tokenizer files copied next to the tiny test model (those present in the source folder).
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder_dir(path: Path, *, seed: int = 0) -> Path:
    """Save a tiny random BERT (hidden 32, 2 layers) with the real MiniLM tokenizer into ``path``.

    Meant for tests: ``TextEncoder(str(path))`` loads it offline in well under a second.
    Different seeds give different weights (and so a different ``model_id``). The global
    torch random state is left untouched.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    source = Path(default_text_model_path())
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copyfile(source / name, path / name)
    vocab_size = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    model.save_pretrained(path)
    return path
