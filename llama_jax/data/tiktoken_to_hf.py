"""Llama 3 tiktoken BPE -> Hugging Face tokenizer.json.

Meta's Llama 3 release and the tokenizers llama_jax trains (`train_bpe`) ship only `tokenizer.model`, a tiktoken rank
table, while Hub tools (transformers, vLLM, TGI, the Hub's own widgets) read `tokenizer.json`. The file written here
encodes every text to the same ids as tiktoken, so a model exported with it behaves on the Hub as it did here.
"""

from __future__ import annotations

import math

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from llama_jax.errors import DataError


def tokenizer_json(
    ranks: dict[bytes, int], special_tokens: dict[str, int], split_pattern: str, bos_token: str | None
) -> str:
    """The tokenizer.json text of a tiktoken encoding (`ranks`, `special_tokens`, `split_pattern`).

    tiktoken has no merge list: it repeatedly joins the adjacent pair whose concatenation has the lowest rank.
    Hugging Face BPE needs explicit merges; giving each token the merges by which tiktoken can make it (see
    `_merges`), in rank order, makes both join the same pairs in the same order on every text.
    `ignore_merges=True` mirrors tiktoken taking a whole pre-token as one token whenever it is in the vocabulary.
    `bos_token`, when given, is prepended by the post-processor, as in Meta's Llama 3 Hub tokenizer.json.
    """
    spelling = gpt2_bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return token.decode("latin-1").translate(spelling)  # latin-1 turns each byte into the char of that code

    vocab = {spelled(token): rank for token, rank in ranks.items()}
    merges = [
        (spelled(left), spelled(right))
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
        for left, right in _merges(ranks, token, rank)
    ]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(split_pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    by_id = sorted(special_tokens.items(), key=lambda item: item[1])
    tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False) for name, _ in by_id])
    for name, token_id in by_id:
        if tok.token_to_id(name) != token_id:  # add_special_tokens numbers them after the vocab, in this order
            raise DataError(f"special token {name!r} has id {token_id}, but ids must follow the {len(ranks)} ranks "
                            "without gaps: renumber the special tokens")
    # Only offsets depend on the ByteLevel step; trim_offsets=False keeps them on the spaces, as Meta's file does.
    steps = [processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)]
    if bos_token is not None:
        steps.append(processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, special_tokens[bos_token])],
        ))
    tok.post_processor = processors.Sequence(steps)
    return tok.to_str()


def _merges(ranks: dict[bytes, int], token: bytes, rank: int) -> list[tuple[bytes, bytes]]:
    """The pairs whose join makes `token` in tiktoken: usually one, the last join of BPE on its bytes with lower ranks.

    Whatever the surrounding text, the joins inside a token's span before its own are each the lowest-ranked one
    in the span, so when they are all lower than `rank` they are this very run and end in the same two parts; a
    merge of any other split would let Hugging Face join pieces that tiktoken leaves apart. A few tokens cannot be
    built from lower ranks (Llama 3 has some, e.g. " Việt"): tiktoken makes one of those from any two tokens that
    happen to meet and spell it, so each such split is a merge; alone, ignore_merges takes it whole as tiktoken does.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [ranks.get(left + right, math.inf) for left, right in zip(parts, parts[1:])]
    while len(parts) > 2:
        lowest = min(pair_ranks)
        if lowest >= rank:
            return [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        i = pair_ranks.index(lowest)  # leftmost on ties, as tiktoken
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = ranks.get(parts[i - 1] + parts[i], math.inf)
        if i < len(parts) - 1:
            pair_ranks[i] = ranks.get(parts[i] + parts[i + 1], math.inf)
    return [(parts[0], parts[1])]


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which Hugging Face byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}
