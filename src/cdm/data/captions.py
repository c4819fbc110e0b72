"""Captions of the embedded data: what a text-conditioned compartment reads.

- emoji: the Unicode name in lower case and the subcategory in words, ``"red apple, food fruit"``;
- glyphs: the font's look and stroke, and the character, ``"a bold italic serif seven"``;
- digits: ``"a handwritten seven"``.

Captions are data of their source (:attr:`cdm.data.Source.captions`): hashed with it and forgotten with it.
"""

from __future__ import annotations

import re

__all__ = ["EMPTY_CAPTION", "character_words", "digit_caption", "emoji_caption", "glyph_caption"]

EMPTY_CAPTION = ""  # the "no condition" caption: classifier-free guidance's unconditional branch

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# font file -> words for its look (the look a reader sees, not the family name)
_FONT_WORDS = {
    "DejaVuSans": "sans-serif", "DejaVuSans-Bold": "bold sans-serif", "DejaVuSans-Oblique": "italic sans-serif",
    "DejaVuSerif": "serif", "DejaVuSerif-Bold": "bold serif", "DejaVuSerif-Italic": "italic serif",
    "DejaVuSansMono": "monospace", "STIXGeneral": "serif", "STIXGeneralBol": "bold serif",
    "STIXGeneralItalic": "italic serif", "cmr10": "classic serif", "cmss10": "classic sans-serif",
    "cmtt10": "typewriter",
}


def character_words(char: str) -> str:
    """``"7"`` -> ``"seven"``, ``"A"`` -> ``"letter A"``."""
    return _NUMBERS[int(char)] if char.isdigit() and len(char) == 1 else f"letter {char}"


def _article(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def digit_caption(char: str) -> str:
    """``"a handwritten seven"``."""
    return f"a handwritten {character_words(char)}"


def glyph_caption(font: str, stroke: int, char: str) -> str:
    """From a glyph's generation parameters: ``"a thick italic serif seven"`` (stroke 2 reads "thick")."""
    look = _FONT_WORDS.get(font, "printed")
    weight = "thick " if stroke >= 2 else ""
    return _article(f"{weight}{look} {character_words(char)}")


def emoji_caption(name: str, subcategory: str) -> str:
    """``("RED APPLE", "food-fruit")`` -> ``"red apple, food fruit"``."""
    words = re.sub(r"\s+", " ", name.lower().replace("_", " ")).strip()
    return f"{words}, {subcategory.replace('-', ' ')}"
