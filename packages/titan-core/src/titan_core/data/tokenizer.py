"""Tokenizers: a thin wrapper over a Hugging Face ``tokenizer.json``.

Only the fast ``tokenizers`` library is used: no ``transformers``, no remote code, no downloads.
BOS and EOS come from ``tokenizer_config.json`` when it names them, else from the special tokens
that common model families put in their vocabularies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import tokenizers

from titan_core.data.embedded import embedded_assets_dir
from titan_core.errors import UserError

_FIELD = "model.hf_assets_path"
EMBEDDED = "embedded"
"""``model.hf_assets_path`` value naming the embedded tokenizer explicitly (as ``titan.json``
records it); ``""`` names it too, except when training starts from a Hugging Face folder."""
# Tried in order when tokenizer_config.json does not name the token (or names one not in the vocab).
_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<|bos|>")  # Llama 3, Llama 2 / Mistral, titan
_EOS_CANDIDATES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<|eos|>")  # ..., GPT-2 / Qwen
# Longer documents are tokenized a piece at a time (see text_pieces); shorter ones in one call.
MAX_PIECE_CHARS = 1 << 18


class Tokenizer:
    """Text to token ids and back, with the ids of the document boundary tokens.

    Attributes:
        vocab_size: number of ids, special tokens included.
        bos_id: id put before every document.
        eos_id: id put after every document; equal to ``bos_id`` for families with one boundary
            token (Qwen's ``<|endoftext|>``).
        pad_id: id of the padding token ``tokenizer_config.json`` names, else None.
        has_bos: False when the tokenizer has no BOS token of its own and ``bos_id`` is its EOS.
        folder: the folder its files were read from (copied into checkpoints and exports), or
            None when it was built some other way.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        bos_id: int,
        eos_id: int,
        *,
        pad_id: int | None = None,
        has_bos: bool = True,
        folder: Path | None = None,
    ) -> None:
        """Wrap a loaded tokenizer.

        Args:
            tokenizer: a ``tokenizers.Tokenizer``.
            bos_id: id of the beginning-of-document token.
            eos_id: id of the end-of-document token.
            pad_id: id of the padding token, if the tokenizer has one.
            has_bos: whether ``bos_id`` is a BOS token of the tokenizer's own.
            folder: where ``tokenizer.json`` (and ``tokenizer_config.json``) came from.
        """
        self._tok = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.has_bos = has_bos
        self.folder = folder

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``, with no BOS or EOS added.

        Args:
            text: the text to encode.
        """
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Return the ids Hugging Face's fast tokenizer gives for ``tokenizer(text)``: with the
        special tokens of ``tokenizer.json``'s post-processor (e.g. BOS first).

        Args:
            text: the prompt to encode.
        """
        return self._tok.encode(text, add_special_tokens=True).ids

    def token(self, token_id: int) -> str | None:
        """The text of the token ``token_id`` (e.g. ``"<|eos|>"``), or None if there is none.

        Args:
            token_id: a token id.
        """
        return self._tok.id_to_token(token_id)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Return the text of ``ids``.

        Args:
            ids: token ids.
            skip_special_tokens: drop BOS, EOS and other special tokens from the text.
        """
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )


class DocumentTokens:
    """The tokens ``[bos] + encode(text) + [eos]`` of one document, tokenized as they are read.

    The text is tokenized one :func:`text_pieces` piece at a time, only when a reader needs tokens
    beyond those already made, and tokens before the reader's offset are dropped: memory holds one
    piece's tokens, not the whole document's, and a reader that stops early tokenizes only a prefix.
    """

    def __init__(self, text: str, tokenizer: Tokenizer, max_chars: int = MAX_PIECE_CHARS) -> None:
        """Prepare to tokenize ``text``.

        Args:
            text: the document.
            tokenizer: supplies ``encode``, ``bos_id`` and ``eos_id``.
            max_chars: the longest piece of text tokenized in one call.
        """
        self._tokenizer = tokenizer
        self._pieces = text_pieces(text, max_chars)
        self._tokens: list[int] = [tokenizer.bos_id]
        self._start = 0  # token position in the document of self._tokens[0]
        self._ended = False  # EOS appended: self._tokens reaches the document's end

    def take(self, offset: int, n: int) -> list[int]:
        """Return the document's tokens ``[offset, offset + n)``: fewer at its end, none past it.

        Args:
            offset: a token position, not less than any passed before (earlier tokens are gone).
            n: the number of tokens wanted.
        """
        while offset + n > self._start + len(self._tokens) and not self._ended:
            self._extend(offset)
        i = offset - self._start
        return self._tokens[i : i + n]

    def ends_at(self, offset: int) -> bool:
        """Whether token position ``offset`` is at (or past) the end of the document.

        Args:
            offset: a token position, at most the end of the tokens last returned by :meth:`take`.
        """
        return self._ended and offset >= self._start + len(self._tokens)

    def _extend(self, offset: int) -> None:
        used = min(offset - self._start, len(self._tokens))
        del self._tokens[:used]
        self._start += used
        piece = next(self._pieces, None)
        if piece is None:
            self._tokens.append(self._tokenizer.eos_id)
            self._ended = True
        else:
            self._tokens += self._tokenizer.encode(piece)


def text_pieces(text: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters, cut at word starts.

    A text of at most ``max_chars`` characters is one piece, so it tokenizes exactly as a whole.
    A longer one is cut just before a space that follows a non-space, into pieces that start at
    ``max_chars / 16`` and double (a reader that needs only the start tokenizes little of it).
    NOTE: byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen) never join a non-space and the
    space after it in one pre-token, so their tokens are the same as the whole text's; a
    tokenizer that marks the start of every input (a SentencePiece normalizer that prepends its
    word marker) adds a token at each cut. A stretch with no such space is cut at the piece
    size, which may split a token there.

    Args:
        text: the text to split.
        max_chars: the longest piece.
    """
    if len(text) <= max_chars:
        yield from (text,) if text else ()
        return
    start, size = 0, max(1, max_chars // 16)
    while len(text) - start > size:
        cut = _word_start(text, start, start + size)
        yield text[start:cut]
        start, size = cut, min(2 * size, max_chars)
    yield text[start:]


def _word_start(text: str, lo: int, hi: int) -> int:
    """The last ``p`` in ``(lo, hi]`` with a space at ``p`` after a non-space, else ``hi``."""
    p = text.rfind(" ", lo + 1, hi + 1)
    while p > lo:
        if not text[p - 1].isspace():
            return p
        p = text.rfind(" ", lo + 1, p)
    return hi


def load_tokenizer(hf_assets_path: str, field: str = _FIELD) -> Tokenizer:
    """Load the tokenizer of a model folder, or the embedded one.

    Args:
        hf_assets_path: a folder holding ``tokenizer.json`` (and optionally
            ``tokenizer_config.json``); ``""`` or ``"embedded"`` selects the embedded
            byte-level BPE tokenizer.
        field: what named the folder, for error messages.

    Raises:
        UserError: the folder or ``tokenizer.json`` is missing or unreadable, or no EOS token
            can be found.
    """
    embedded = hf_assets_path in ("", EMBEDDED)
    folder = embedded_assets_dir() if embedded else Path(hf_assets_path).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"{field}: {folder} is not a folder; pass a folder holding tokenizer.json "
            '(e.g. a Hugging Face model download), or "" for the embedded tokenizer'
        )
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(
            f"{field}: {folder} has no tokenizer.json; download the model's tokenizer files "
            "into it or point the field at the folder that holds them"
        )
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises bare Exception subclasses
        raise UserError(
            f"{field}: {path} could not be read as a tokenizers file "
            f"({_first_line(err)}); re-download it from the model repository"
        ) from err
    bos_name, eos_name, pad_name = _configured_tokens(folder, field)
    eos_id = _find_token(tok, eos_name, _EOS_CANDIDATES)
    if eos_id is None:
        raise UserError(
            f"{field}: no end-of-text token in {path} (looked for {eos_name or 'eos_token'} "
            f"from tokenizer_config.json and {', '.join(_EOS_CANDIDATES)}); add "
            '"eos_token" to tokenizer_config.json'
        )
    bos_id = _find_token(tok, bos_name, _BOS_CANDIDATES)
    pad_id = _find_token(tok, pad_name, ()) if pad_name else None
    # NOTE: families such as Qwen have no BOS; their one boundary token serves as both.
    return Tokenizer(
        tok,
        eos_id if bos_id is None else bos_id,
        eos_id,
        pad_id=pad_id,
        has_bos=bos_id is not None,
        folder=folder.resolve(),
    )


def _configured_tokens(folder: Path, field: str) -> tuple[str | None, str | None, str | None]:
    """Return the (bos_token, eos_token, pad_token) named by ``tokenizer_config.json``."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None, None, None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{field}: {path} is not valid JSON ({_first_line(err)}); fix or delete the file"
        ) from err
    if not isinstance(config, dict):
        return None, None, None
    names = (config.get(key) for key in ("bos_token", "eos_token", "pad_token"))
    return tuple(_token_name(name) for name in names)  # type: ignore[return-value]


def _token_name(value: object) -> str | None:
    # transformers writes either "<s>" or {"content": "<s>", "lstrip": false, ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _find_token(
    tok: tokenizers.Tokenizer, configured: str | None, candidates: tuple[str, ...]
) -> int | None:
    for name in ((configured,) if configured else ()) + candidates:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
