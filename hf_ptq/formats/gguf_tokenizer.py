"""The tokenizer of a GGUF export: which of llama.cpp's pre-tokenizers splits text as this tokenizer does, and the
vocabulary under llama.cpp's keys.

llama.cpp does not run a tokenizer's own pre-tokenizer: it looks up the name in `tokenizer.ggml.pre` and applies its
built-in regular expressions. A wrong name loads (or fails: llama.cpp knows no "gpt2") and then tokenizes differently
from transformers. So the name is not guessed from the tokenizer's class or the model family; it is identified from
behaviour: the tokenizer's pre-tokenizer splits a probe text of contractions, digit runs, whitespace runs, newlines,
punctuation, accented, CJK and emoji text, and the name is the candidate whose expressions split it identically.
SentencePiece-style tokenizers (BPE with byte fallback and "▁" for spaces: Llama 2, Mistral) are written as llama.cpp's
"llama" vocabulary, whose merge order is a score per token: the negated rank of the first merge that makes it, so
that merging the best-scored adjacent pair first reproduces the merges' order. Anything else is refused by name.
"""

from __future__ import annotations

import json
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

# Letters, digits, contractions, whitespace: GPT-2's split (also the last step of the digit-splitting variants).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
# llama.cpp's `tokenizer.ggml.pre` name -> the expressions it applies one after the other (src/llama-vocab.cpp)
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (_GPT2,),
    "smollm": (r"\p{N}", _GPT2),  # digits one by one, then GPT-2's split
    "llama-bpe": (_LLAMA3,),
    "qwen2": (_QWEN2,),
}

PROBE = (
    "Hello world! It's 12345 o'clock, isn't it? I'LL SEE... we'd've 3.14159 and 1,000,000 -- ok?!\n\n"
    "  two  spaces,\ttab\t\tand trailing   \n\r\nline\nbreaks\n   \n"
    "déjà vu, Ünïcödé naïveté; 東京は晴れ 2024年; Привет мир; 🙂🚀 emoji‼ «quotes» “curly” (brackets) [x] {y}\n"
    "code: def f(x): return x**2 + 0x1F  # comment\n    indented_line = a_b-c/d\\e|f@g$h%i^j&k*l\n"
    "mixedCASE123abc 007bond ...   ,,, ;;; ''' \"\"\" 1/2 ½ ³ ⅷ"
)


def _pieces(pre_tokenizer: Any, text: str) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def _candidate(expressions: tuple[str, ...]) -> Any:
    from tokenizers import Regex, pre_tokenizers

    steps = [pre_tokenizers.Split(Regex(e), behavior="isolated") for e in expressions]
    return pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spec(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


SPACE = "\u2581"  # SentencePiece's space


def vocabulary_kind(tokenizer: Any) -> tuple[str, str | None]:
    """("gpt2", llama.cpp's `tokenizer.ggml.pre` name) for byte-level BPE tokenizers, ("llama", None) for
    SentencePiece-style ones (spaces as "▁" with one prepended, byte fallback); ValueError naming what is supported
    otherwise."""
    spec = _spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        if _splits_as_sentencepiece(tokenizer):
            _warn_where_llama_cpp_prefixes_otherwise(tokenizer)
            return "llama", None
        raise ValueError(
            f"export(format='gguf'): the tokenizer ({type(tokenizer).__name__}) has byte fallback but does not turn "
            f"text into '{SPACE}'-joined pieces with one '{SPACE}' prepended, as llama.cpp's SentencePiece vocabulary "
            "does. Export with format='compressed-tensors' or 'gptq'."
        )
    return "gpt2", pre_tokenizer_name(tokenizer, spec)


def _sentencepiece_pieces(tokenizer: Any, text: str) -> list[str]:
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    return _pieces(backend.pre_tokenizer, text) if backend.pre_tokenizer is not None else [text]


def _splits_as_sentencepiece(tokenizer: Any) -> bool:
    text = PROBE.replace("\r", "")
    return _sentencepiece_pieces(tokenizer, text) == [SPACE + text.replace(" ", SPACE)]


def _warn_where_llama_cpp_prefixes_otherwise(tokenizer: Any) -> None:
    """llama.cpp prepends "▁" to every run of text, unconditionally: to text that starts with a space and to the
    text after each special token. Tokenizers that do not (transformers' Metaspace pre-tokenizer: only where the
    text does not start with "▁", and with `prepend_scheme="first"` only before the first piece) differ there."""
    where = []
    if _sentencepiece_pieces(tokenizer, " a") != [SPACE * 2 + "a"]:
        where.append("text that starts with a space")
    special = next((t for t in tokenizer.all_special_tokens if t != tokenizer.unk_token), None)
    if special is not None:
        pieces = tokenizer.backend_tokenizer.encode(special + "a", add_special_tokens=False).tokens
        if len(pieces) > 1 and not pieces[1].startswith(SPACE):
            where.append(f"text after a special token (e.g. {special!r} in chat templates)")
    if where:
        logger.warning(
            f"gguf export: llama.cpp prepends '{SPACE}' to every run of text and this tokenizer does not, so llama.cpp "
            f"will tokenize {' and '.join(where)} differently from transformers; other text tokenizes the same."
        )


def pre_tokenizer_name(tokenizer: Any, spec: dict | None = None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE `tokenizer` (a transformers fast tokenizer); ValueError,
    naming what is supported, when it is not one or splits text as none of `PRE_TOKENIZERS` does."""
    spec = _spec(tokenizer) if spec is None else spec  # tokenizer.json as a dict, when the caller has parsed it
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise ValueError(
            "export(format='gguf') writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2/3, SmolLM) and "
            "SentencePiece-style BPE ones with byte fallback (Llama 2, Mistral); this tokenizer "
            f"({type(tokenizer).__name__}, model {model.get('type')!r}"
            f"{', with a normalizer' if spec.get('normalizer') else ''}) is not one hf_ptq can describe to llama.cpp. "
            "Export with format='compressed-tensors' or 'gptq', or convert with llama.cpp's convert_hf_to_gguf.py."
        )
    own = tokenizer.backend_tokenizer.pre_tokenizer
    if own is None:
        raise ValueError(f"export(format='gguf'): the tokenizer ({type(tokenizer).__name__}) has no pre-tokenizer.")
    expected = _pieces(own, PROBE)
    for name, expressions in PRE_TOKENIZERS.items():
        if _pieces(_candidate(expressions), PROBE) == expected:
            return name
    raise ValueError(
        f"export(format='gguf'): the tokenizer's pre-tokenizer ({type(tokenizer).__name__}) splits text as none of "
        f"llama.cpp's {', '.join(PRE_TOKENIZERS)} do, so llama.cpp would tokenize differently. Export with "
        "format='compressed-tensors' or 'gptq'."
    )


def check_vocabulary(tokenizer: Any, rows: int) -> None:
    """ValueError when the tokenizer has ids the embedding (`rows` rows) cannot hold."""
    if len(tokenizer) > rows:
        raise ValueError(f"export(format='gguf'): the tokenizer has {len(tokenizer)} tokens, the model {rows} rows.")


def write_tokenizer(
    writer: Any, tokenizer: Any, rows: int, kind: tuple[str, str | None], pad_id: int | None = None
) -> None:
    """The vocabulary (padded with unused `[PAD<i>]` tokens to the embedding's `rows`), merges (byte-level BPE) or
    scores (SentencePiece-style), special ids, BOS/EOS behaviour and chat template, under llama.cpp's keys. `pad_id`:
    the model config's padding id, written where the tokenizer has none (transformers' reader otherwise builds some
    models, Phi-3, with their class's default padding id, which may lie outside the vocabulary)."""
    import gguf

    model, pre = kind
    kinds = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [kinds.UNUSED] * rows
    vocab = tokenizer.get_vocab()
    for token, index in vocab.items():
        tokens[index], types[index] = token, kinds.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in _spec(tokenizer)["model"]["merges"]]
    if model == "llama":
        scores = [0.0] * rows
        for rank in range(len(merges) - 1, -1, -1):  # the lowest rank that makes a token wins
            made = vocab.get(merges[rank].replace(" ", "", 1))
            if made is not None:
                scores[made] = -float(rank + 1)
        for index, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[index] = kinds.BYTE
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = kinds.UNKNOWN
    for index, added in tokenizer.added_tokens_decoder.items():
        if types[index] != kinds.UNKNOWN:
            types[index] = kinds.CONTROL if added.special else kinds.USER_DEFINED
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if model == "llama":
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(True)
    else:
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    for key in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{key}_token_id", None)
        if key == "pad" and index is None and pad_id is not None and 0 <= pad_id < rows:
            index = pad_id
        if index is not None:
            getattr(writer, f"add_{key}_token_id")(index)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
