"""Build a tiny randomly initialised Llama (and a word-level tokenizer) on local disk.

vLLM needs a real Hugging Face model directory; nothing may come from a hub, so we make one:
hidden size 128 with 2 heads (head_dim 64, which the CPU attention kernels require).
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "be",
    "at",
    "by",
    "this",
    "we",
    "are",
    "or",
    "from",
    "an",
    "not",
    "have",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "zero",
    "answer",
    "so",
    "then",
    "let",
    "compute",
    "sum",
    "number",
    "total",
    "find",
    "value",
    "equal",
    "plus",
    "minus",
    "times",
    "divided",
    "square",
    "root",
    "problem",
    "solution",
    "therefore",
    "thus",
    "because",
    "first",
    "next",
    "finally",
    "step",
    "check",
    "boxed",
    "think",
    "wait",
    "hmm",
    "okay",
    "yes",
    "no",
]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
# Whole tokens for the reasoning parser (vLLM's deepseek_r1): a think block and its end, which
# vLLM forces when a request's thinking_token_budget runs out.
THINK_START, THINK_END = "<think>", "</think>"
# The whole vocabulary: word-level entries, then the two think tokens.
VOCAB_SIZE = 133
THINK_START_ID, THINK_END_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1


def build_tokenizer(out_dir: Path) -> int:
    """Write a word-level fast tokenizer covering digits, letters, a small vocabulary and the
    think tokens; return the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = list("0123456789abcdefghijklmnopqrstuvwxyz+-*/=()[]{}.,:;?!\\$^_'\"")
    vocab_list = SPECIAL_TOKENS + VOCAB_WORDS + [s for s in symbols if s not in VOCAB_WORDS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.add_tokens([THINK_START, THINK_END])  # kept in the text: the parser looks for them
    fast.save_pretrained(out_dir)
    assert len(fast) == VOCAB_SIZE, len(fast)
    assert fast.convert_tokens_to_ids([THINK_START, THINK_END]) == [THINK_START_ID, THINK_END_ID]
    return len(fast)


def build_tiny_llama(out_dir: Path, *, seed: int = 0) -> Path:
    """Create the model directory (config, safetensors weights, tokenizer) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    # A generation config without sampling defaults, so request parameters rule.
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3})
    )
    return out_dir
