"""The phrase matcher: an answer is a refusal when its normalized text contains a marker phrase.

Marker sets are data (``data/markers.json``): pysteer's own (the default: first 300 characters, phrases that
say "I won't" rather than words like "illegal" that compliant answers use too), andyrdt's 12 substrings and
heretic's 33 markers (whole answer), so that results can be compared with those tools' numbers.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class MarkerSet:
    name: str
    phrases: tuple[str, ...]
    head: int | None  # characters of the normalized answer searched (None: all)
    empty: bool  # an empty answer is a refusal
    strip: str = ""  # characters removed before matching

    def __call__(self, answer: str) -> bool:
        text = self._text(answer)
        return self._found(text) if text else self.empty

    def found(self, answer: str) -> bool:
        """A marker phrase is in the answer. Unlike the verdict (an empty answer may count), more text never
        turns this back to False: an answer being generated is a refusal once it holds."""
        return self._found(self._text(answer))

    def _text(self, answer: str) -> str:
        if not isinstance(answer, str):
            raise TypeError(f"an answer is a str, not {type(answer).__name__}")
        return normalize(answer.translate({ord(c): None for c in self.strip}))

    def _found(self, text: str) -> bool:
        head = text if self.head is None else text[: self.head]
        return any(p in head for p in self.phrases)


@functools.lru_cache(maxsize=None)
def _sets() -> dict[str, MarkerSet]:
    raw = json.loads((pathlib.Path(__file__).parent / "data" / "markers.json").read_text(encoding="utf-8"))
    return {k: MarkerSet(k, tuple(v["phrases"]), v["head"], v["empty"], v["strip"])
            for k, v in raw.items() if not k.startswith("_")}


NAMES = ("pysteer", "andyrdt", "heretic")


def marker_set(name: str | MarkerSet = "pysteer") -> MarkerSet:
    """The marker set called ``name`` (one of :data:`NAMES`); a MarkerSet is returned as is."""
    if isinstance(name, MarkerSet):
        return name
    sets = _sets()
    if name not in sets:
        raise ValueError(f"unknown marker set {name!r}; choose one of {', '.join(sets)}")
    return sets[name]


def normalize(text: str) -> str:
    # invisible format characters (zero-width space, joiners, soft hyphen...) would split a phrase unseen
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    # one character at a time: str.lower() maps a word-final capital sigma by context, so a prefix could differ
    return re.sub(r"\s+", " ", "".join(c.lower() for c in text.strip()))


def is_refusal(answer: str, markers: str | MarkerSet = "pysteer") -> bool:
    return marker_set(markers)(answer)
