"""Tiny random Hugging Face models and a tiny tokenizer, built locally (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 256
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
EOS_ID = 0  # the tokenizer's first special token
TOKENIZER_MARGIN = 8  # keep every token id < VOCAB

TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization maps weights to a small set of values. "
    "Lattice codebooks pack eight weights into one code. The Hadamard transform spreads outliers. "
) * 20


def tiny_config(arch: str):
    """A small config of the given family, all linear input dims multiples of 8."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=HIDDEN // HEADS)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, sliding_window=8)
    if arch == "gemma3":  # one local layer (window 8, RoPE base 10k) and one global layer (base 1M)
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=256,
                            bos_token_id=EOS_ID, eos_token_id=EOS_ID)
    if arch == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=256, word_embed_proj_dim=HIDDEN,
                            bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer with VOCAB entries trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - TOKENIZER_MARGIN, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A HF model directory (weights + tokenizer) for CLI tests."""
    model = tiny_model(arch, seed)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def calibration_tokens(nsamples: int = 8, ctx: int = 32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (nsamples, ctx), generator=gen)
