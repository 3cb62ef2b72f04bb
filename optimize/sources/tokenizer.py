"""Offline CLIP tokenizers for built-in models.

CLIP's tokenizer is byte-pair encoding over a vocabulary of sub-words. The built-in models need no real vocabulary,
only a deterministic tokenizer that diffusers' pipelines can call, so we build a BPE whose merges spell every word
of a small word list; unknown words fall back to single characters (and the unknown token for characters outside
the list). Nothing is downloaded.

>>> tok = word_tokenizer(["a", "red", "circle"], max_length=8)
>>> ids = tok("a red circle", padding="max_length", max_length=8).input_ids
>>> len(ids), ids[0] == tok.bos_token_id, ids[4] == tok.eos_token_id
(8, True, True)
>>> word_tokenizer(["right", "triangle"]).tokenize("triangle right")      # every listed word is one token
['triangle</w>', 'right</w>']
"""
from __future__ import annotations

import string

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words for the random:* built-ins: common prompt words, so prompts tokenize to words rather than characters.
DEFAULT_WORDS = """
a an the of on in at with and or to from by for is are above below left right top bottom center middle small large
big tiny red green blue yellow orange purple pink white black gray grey brown cyan magenta circle square triangle star
cross ring heart diamond hexagon shape object background photo painting drawing picture portrait landscape city street
house tree forest mountain river sea ocean sky cloud sun moon night day light dark cat dog horse bird car boat man
woman person astronaut riding mars space detailed high quality realistic style art digital render cinematic
""".split()


def word_tokenizer(words=DEFAULT_WORDS, max_length: int = 77, pad_token: str = EOS):
    """A ``CLIPTokenizer`` whose BPE merges spell each of ``words`` as one token."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + ".,!?'-:;") | set("".join(words)))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted(set(w.lower() for w in words)):
        _chain(list(word[:-1]) + [word[-1] + "</w>"], merges, seen, vocab)
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    # BPE applies the lowest-ranked merge first, wherever it is, so one word's chain can be cut by another's: with
    # "right" before "triangle", r+i merges first and "triangle" fell apart into 7 pieces. Chain each broken
    # word's actual pieces with extra (later) merges until every word is one token.
    targets = {w: w + "</w>" for w in set(w.lower() for w in words)}
    for _ in range(len(targets) + 1):
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)
        broken = {w: tok.tokenize(w) for w, t in sorted(targets.items()) if tok.tokenize(w) != [t]}
        if not broken:
            return tok
        for pieces in broken.values():
            _chain(pieces, merges, seen, vocab)
    raise RuntimeError(f"cannot build merges that spell {sorted(broken)} as single tokens")


def _chain(pieces: list, merges: list, seen: set, vocab: dict) -> None:
    """Append the merges (and vocabulary entries) that join ``pieces`` left to right into one token."""
    cur = pieces[0]
    for nxt in pieces[1:]:
        if (cur, nxt) not in seen:
            seen.add((cur, nxt))
            merges.append((cur, nxt))
        cur = cur + nxt
        vocab.setdefault(cur, len(vocab))


def t5_tokenizer(words=DEFAULT_WORDS, model_max_length: int = 512):
    """A T5 tokenizer (``T5TokenizerFast``, a Unigram model) over ``words``, built offline: ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2 as T5's, one ``▁word`` piece per word and single characters as (costly) fall-backs; T5's own
    pre-tokenizer and its ``$A </s>`` post-processor come with the class. For SD3's and FLUX's T5 encoder.

    >>> tok = t5_tokenizer(["a", "red", "circle"])
    >>> tok.convert_ids_to_tokens(tok("a red circle, x").input_ids)
    ['▁a', '▁red', '▁circle', ',', '▁x', '</s>']
    """
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in vocab}
    for w in sorted(set(w.lower() for w in words)):
        if "\u2581" + w not in seen:
            vocab.append(("\u2581" + w, -1.0))
            seen.add("\u2581" + w)
    for c in string.ascii_letters + string.digits + ".,!?'-:;":
        for piece in (c, "\u2581" + c):
            if piece not in seen:
                vocab.append((piece, -8.0))
                seen.add(piece)
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
