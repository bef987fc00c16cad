"""GeoPixel's text side: InternLM2's SentencePiece tokenizer, the chat template, and phrases from answers.

The official code wraps ``tokenizer.model`` in InternLM2's slow transformers tokenizer (transformers 4.33)
and adds ``[SEG]``, ``<p>`` and ``</p>`` from ``added_tokens.json``. What that does to a text, and what
:meth:`GeoPixelTokenizer.encode` reproduces:

* The text is cut at every added token and every special token the tokenizer files name
  (``<s>``, ``</s>``, ``<unk>``, ``additional_special_tokens``); whitespace on both sides of each cut is
  dropped (4.33's default for tokens added as plain strings), so ``"</p> [SEG]"`` is two ids, no space.
* Each piece of text between cuts is encoded by SentencePiece on its own, so the model's own settings
  apply (``add_dummy_prefix``, byte fallback, and whether chat markers such as ``[UNUSED_TOKEN_146]`` are
  pieces kept whole: user-defined pieces are; the tiny test tokenizer defines them so).

The ids equal the official tokenizer's (transformers 4.33.2) on reference texts: chat markers, phrases,
spaces around added tokens, non-ASCII text, ``<s>`` in text (``tests/data/geopixel_tokenizer``).
transformers' own tokenizer classes are not used: from version 5 they are backed by the ``tokenizers``
library, and ``LlamaTokenizer`` built from the same ``tokenizer.model`` gave other ids for 7 of those 8
texts; the 4.33 splitting rule above is not theirs any more. SentencePiece is the reference implementation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from geobatch.errors import GeobatchError

SEG, PHRASE_START, PHRASE_END = "[SEG]", "<p>", "</p>"
USER_START = "[UNUSED_TOKEN_146]user\n"
TURN_END = "[UNUSED_TOKEN_145]\n"
ASSISTANT_START = "[UNUSED_TOKEN_146]assistant\n"
# The questions of the official inference guide: GeoPixel-7B-RES's referring form, GeoPixel-7B's description.
REFERRING_QUESTION = "Could you provide a segmentation mask for {expression} in this image?"
DESCRIPTION_QUESTION = (
    "Can you provide a thorough description of this image? "
    "Please output with interleaved segmentation masks for the corresponding phrases."
)


class CheckpointError(GeobatchError, ValueError):
    """A checkpoint folder lacks a file, or a file in it does not fit the model."""


@dataclass(frozen=True, slots=True)
class ChatIds:
    """A question in the chat template, as the token ids on each side of the image."""

    before_image: tuple[int, ...]  # BOS: the official template puts the image first
    after_image: tuple[int, ...]  # the user turn with the question, then the assistant's turn opening


class GeoPixelTokenizer:
    """InternLM2's tokenizer with GeoPixel's added tokens, read from a checkpoint folder.

    ``tokenizer.model`` (SentencePiece) and ``added_tokens.json`` (``[SEG]``, ``<p>``, ``</p>``, numbered
    after SentencePiece's pieces) are required; ``special_tokens_map.json`` / ``tokenizer_config.json``
    are read for ``additional_special_tokens`` when present.
    """

    def __init__(self, directory: str | Path) -> None:
        import sentencepiece

        directory = Path(directory)
        model_file = _required(directory / "tokenizer.model")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{model_file}: not a SentencePiece model ({exc})") from None
        self.added = _added_tokens(_required(directory / "added_tokens.json"), self._sp.get_piece_size())
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.seg_id, self.phrase_start_id, self.phrase_end_id = (self.added[t] for t in (SEG, PHRASE_START, PHRASE_END))
        cuts = {*self.added, *(self._sp.id_to_piece(i) for i in self._special_ids()), *_additional_special(directory)}
        self._cut = re.compile("(" + "|".join(re.escape(t) for t in sorted(cuts, key=len, reverse=True)) + ")")
        self._ids_of = {**{self._sp.id_to_piece(i): i for i in self._special_ids()}, **self.added}
        self._added_of = {i: t for t, i in self.added.items()}

    @property
    def vocab_size(self) -> int:
        """Ids in use: SentencePiece's pieces and the added tokens."""
        return self._sp.get_piece_size() + len(self.added)

    def _special_ids(self) -> list[int]:
        return [i for i in (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()) if i >= 0]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS, as the official tokenizer gives them (see the module doc)."""
        pieces = self._cut.split(text)  # text, cut, text, cut, ..., text
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index % 2:
                ids.append(self._ids_of[piece])
                continue
            piece = piece.lstrip() if index > 0 else piece
            piece = piece.rstrip() if index < len(pieces) - 1 else piece
            ids += self._sp.encode(piece) if piece else []
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: added tokens set off by single spaces, BOS/EOS and chat markers left out."""
        parts, run = [], []
        for token_id in ids:
            if token_id in self._added_of:
                parts += [self._sp.decode(run), self._added_of[token_id]]
                run = []
            elif token_id not in self._special_ids():
                run.append(int(token_id))
        parts.append(self._sp.decode(run))
        text = " ".join(p.strip() for p in parts if p.strip())
        return re.sub(r"\[UNUSED_TOKEN_\d+\]", "", text).strip()

    def chat(self, question: str) -> ChatIds:
        """``question`` about one image in GeoPixel's chat template (the official ``interleav_wrap_chat``)."""
        return ChatIds((self.bos_id,), tuple(self.encode(USER_START + question + TURN_END + ASSISTANT_START)))

    def phrases(self, ids: Sequence[int], default: str) -> list[str]:
        """One phrase per ``[SEG]`` in ``ids``: the ``<p> .. </p>`` just before it, else ``default``.

        Only whitespace may stand between ``</p>`` and its ``[SEG]`` (the official answer format
        ``<p> tennis court </p> [SEG]``); a ``[SEG]`` without such a phrase gets ``default``.
        """
        phrases, opened, closed = [], None, None
        for position, token_id in enumerate(ids):
            if token_id == self.phrase_start_id:
                opened, closed = position, None
            elif token_id == self.phrase_end_id and opened is not None:
                closed = self._sp.decode([int(i) for i in ids[opened + 1 : position]]).strip() or None
                opened = None
            elif token_id == self.seg_id:
                phrases.append(closed or default)
                closed = None
            elif closed is not None and self._sp.decode([int(token_id)]).strip():
                closed = None  # words between </p> and [SEG]: the phrase is not this mask's
        return phrases


def question_for(text: str, kind: str) -> str:
    """What GeoPixel is asked for a prompt: a grounded-description prompt as written, a referring
    expression (or a class name) in the question GeoPixel-7B-RES was trained on."""
    return text if kind == "gcg" else REFERRING_QUESTION.format(expression=text)


def _required(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint folder {path.parent} has no {path.name}")
    return path


def _added_tokens(path: Path, first_id: int) -> dict[str, int]:
    """``added_tokens.json``: token -> id, checked to hold GeoPixel's tokens numbered on from ``first_id``."""
    try:
        added = {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a JSON object of token -> id ({exc})") from None
    missing = [t for t in (SEG, PHRASE_START, PHRASE_END) if t not in added]
    if missing:
        raise CheckpointError(f"{path}: GeoPixel's tokens {missing} are missing")
    expected = list(range(first_id, first_id + len(added)))
    if sorted(added.values()) != expected:
        raise CheckpointError(f"{path}: ids {sorted(added.values())} do not follow the {first_id} SentencePiece pieces")
    return added


def _additional_special(directory: Path) -> list[str]:
    """``additional_special_tokens`` named by the tokenizer files that transformers would read."""
    found: list[str] = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            for token in json.loads(path.read_text()).get("additional_special_tokens", []):
                found.append(token["content"] if isinstance(token, dict) else str(token))
    return found
