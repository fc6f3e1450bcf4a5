"""The format transforms of Study B: one procedure, three response formats, identical content.

Study B asks whether over-fitting to the *format* of benign fine-tuning data erodes safety, so
the three formats must carry exactly the same sentences and differ only in the characters the
transform adds. The pipeline from a WikiHow numbered step list to a response is:

1. Steps (`harness.data.registry.parse_steps`): one step per non-blank line; the leading marker is
   stripped ("N." / "N.." / "N," / "N)" not followed by a digit, a bare "N" followed by two or more
   spaces, or a bullet "•", "∙", "·", "*", "-"); every run of Unicode whitespace (NBSP included)
   becomes one space and the ends are trimmed.
2. Terminal punctuation: a step that does not already end in terminal punctuation gets "."
   appended (so "Tap Settings" -> "Tap Settings.", "Android:" -> "Android:."). Terminal
   punctuation is one or more of `.` `!` `?` `…` optionally followed by closing quotes or
   brackets (`"` `'` `”` `’` `)` `]` `»`), e.g. `Tap "OK."` already ends a sentence.
3. Prose: the steps joined by single spaces. This *is* the prose response.
4. Sentences (`split_sentences`): the prose is cut at every space that

   - follows a word ending in terminal punctuation, and
   - precedes a character that is not a lowercase letter (`str.islower`), and
   - does not follow an abbreviation: a word ending (case-insensitively) in `e.g.`, `i.e.`,
     `ex.`, `vs.`, `mr.`, `mrs.`, `ms.`, `dr.`, `st.`, `approx.`, or a cooking unit `tsp.`,
     `tbsp.`, `tbs.`, `oz.`, `lb.`, `lbs.`, `pkg.`, `fl.`, with no letter just before it.

   Decimals, URLs and "e.g. the" are therefore never split. Because sentences are cut from the
   joined prose, a step boundary the rule does not see (the next step starts with a lowercase
   letter, as in "iPhone", or the step ends in an abbreviation) leaves both steps in one
   sentence: the price of `parse("prose", prose) == sentences` holding exactly.
5. Rendering (`render`), with the characters the transform adds, its `format_spans`:

   - prose: `" ".join(sentences)`; format spans are the single joining spaces.
   - list: one sentence per line, each line `"- " + sentence`, lines joined by "\\n"; format
     spans are the leading "- " and each "\\n- ".
   - json: `json.dumps({"procedure": sentences}, ensure_ascii=False)`; format spans are the
     braces, the `"procedure"` key, colon, brackets, the quotes around each sentence, and the
     `", "` separators. JSON escapes `"`, `\\` and control characters inside strings, so the
     content of a sentence is its *escaped* form, `json.dumps(sentence, ensure_ascii=False)[1:-1]`.

   Everything outside `format_spans` is content (`content_spans`, one per sentence): the
   sentences themselves in order (escaped for json). The instruction is the same for every
   format (`task_instruction`), so the format is learned from the responses alone.

`parse` inverts `render` for every sentence list `render` accepts (`check_sentences`), and
returns None for text that is not in the format; the three formats are mutually exclusive, so
`is_valid` measures format adherence of generated responses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from harness.data.registry import FinetuneRow, Procedure, parse_steps
from harness.errors import HarnessError

Format = Literal["prose", "list", "json"]
FORMATS: tuple[Format, ...] = ("prose", "list", "json")
JSON_KEY = "procedure"
LIST_MARKER = "- "

_TERMINAL_END = re.compile(r"[.!?…]+[\"'”’)\]»]*$")
_ABBREVIATION_END = re.compile(
    r"(?<![A-Za-z])(?:e\.g|i\.e|ex|vs|mr|mrs|ms|dr|st|approx|tsp|tbsp|tbs|oz|lb|lbs|pkg|fl)\.$", re.IGNORECASE
)


class FormatError(HarnessError):
    """Bad input to a format transform: an unknown format or sentences that would not round-trip."""


@dataclass(frozen=True)
class Rendered:
    """A rendered response and which of its characters the format added.

    `format_spans` and `content_spans` are half-open [start, end) character ranges; together they
    tile `text` without overlap. `content_spans[i]` holds sentence i (json: its escaped form).
    """

    text: str
    format_spans: list[tuple[int, int]]
    content_spans: list[tuple[int, int]]


# --- sentences ---------------------------------------------------------------------------------


def _ends_sentence(word: str, next_word: str) -> bool:
    return (
        _TERMINAL_END.search(word) is not None
        and not next_word[0].islower()
        and _ABBREVIATION_END.search(word) is None
    )


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalise `text` and cut it into sentences by the rule in the module docstring."""
    words = text.split()
    sentences: list[str] = []
    start = 0
    for i in range(len(words)):
        if i + 1 == len(words) or _ends_sentence(words[i], words[i + 1]):
            sentences.append(" ".join(words[start : i + 1]))
            start = i + 1
    return sentences


def _terminated(step: str) -> str:
    return step if _TERMINAL_END.search(step) else step + "."


def sentences_from_steps(steps: Sequence[str]) -> list[str]:
    """Sentences of a procedure given its parsed steps (steps 2-4 of the module docstring)."""
    return split_sentences(" ".join(_terminated(" ".join(step.split())) for step in steps if step.strip()))


def procedure_sentences(result_text: str) -> list[str]:
    """Sentences of a WikiHow numbered step list ("1. ...\\n2. ..."); see the module docstring."""
    return sentences_from_steps(parse_steps(result_text))


def check_sentences(sentences: Sequence[str]) -> None:
    """Raise FormatError unless every format renders `sentences` so that `parse` gets them back.

    That needs: at least one sentence; each one non-empty, whitespace-normalised (single spaces,
    no newlines) and ending in terminal punctuation; the prose split back into exactly these
    sentences; and the first not starting with "- " (the prose would read as a list).
    """
    if isinstance(sentences, str) or not sentences:
        raise FormatError("a procedure needs at least one sentence")
    for s in sentences:
        if not isinstance(s, str) or not s or s != " ".join(s.split()):
            raise FormatError(f"sentence {s!r} is empty or not whitespace-normalised")
        if not _TERMINAL_END.search(s):
            raise FormatError(f"sentence {s!r} does not end in terminal punctuation")
    if split_sentences(" ".join(sentences)) != list(sentences):
        raise FormatError(f"sentences {list(sentences)!r} do not split back from their prose")
    if sentences[0].startswith(LIST_MARKER):
        raise FormatError(f"first sentence {sentences[0]!r} starts with the list marker")


# --- render ------------------------------------------------------------------------------------


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise FormatError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")


def _assemble(pieces: list[tuple[str, bool]]) -> Rendered:
    """Concatenate (text, is_content) pieces, recording each piece's span; empty pieces vanish."""
    text, format_spans, content_spans, pos = [], [], [], 0
    for piece, is_content in pieces:
        span = (pos, pos + len(piece))
        if is_content:
            content_spans.append(span)
        elif piece:
            format_spans.append(span)
        text.append(piece)
        pos += len(piece)
    return Rendered("".join(text), format_spans, content_spans)


def render(fmt: Format, sentences: Sequence[str]) -> Rendered:
    """Render sentences in one format, marking which characters the format added."""
    _check_format(fmt)
    check_sentences(sentences)
    if fmt == "prose":
        joiner, opening, closing = " ", "", ""
        contents = list(sentences)
    elif fmt == "list":
        joiner, opening, closing = "\n" + LIST_MARKER, LIST_MARKER, ""
        contents = list(sentences)
    else:
        joiner, opening, closing = '", "', '{"' + JSON_KEY + '": ["', '"]}'
        contents = [json.dumps(s, ensure_ascii=False)[1:-1] for s in sentences]
    pieces = [(opening, False)]
    for i, content in enumerate(contents):
        if i:
            pieces.append((joiner, False))
        pieces.append((content, True))
    pieces.append((closing, False))
    rendered = _assemble(pieces)
    if fmt == "json":  # the spans describe json.dumps' own output, not a look-alike
        assert rendered.text == json.dumps({JSON_KEY: list(sentences)}, ensure_ascii=False)
    return rendered


# --- parse -------------------------------------------------------------------------------------


def _parse_list(text: str) -> list[str] | None:
    """Every non-blank line must start with "- " and carry text; indentation is tolerated."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or not all(line.startswith(LIST_MARKER) for line in lines):
        return None
    return [" ".join(line[len(LIST_MARKER) :].split()) for line in lines]


def _parse_json(text: str) -> list[str] | None:
    """A JSON object whose "procedure" is a non-empty list of strings (other keys are tolerated)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    procedure = value.get(JSON_KEY)
    if not isinstance(procedure, list) or not procedure or not all(isinstance(s, str) for s in procedure):
        return None
    return procedure


def _parse_prose(text: str) -> list[str] | None:
    """Any non-blank text that is neither a list nor a JSON procedure, split into sentences."""
    if not text.strip() or _parse_list(text) is not None or _parse_json(text) is not None:
        return None
    return split_sentences(text)


def parse(fmt: Format, text: str) -> list[str] | None:
    """The sentences of a response in format `fmt`, or None if the text is not in that format."""
    _check_format(fmt)
    if fmt == "list":
        return _parse_list(text)
    if fmt == "json":
        return _parse_json(text)
    return _parse_prose(text)


def is_valid(fmt: Format, text: str) -> bool:
    """Whether a response adheres to format `fmt` (at most one format holds for any text)."""
    return parse(fmt, text) is not None


# --- fine-tuning rows --------------------------------------------------------------------------


def task_instruction(title: str) -> str:
    """Study B's fixed instruction ("explain the procedure for X"), the same for every format."""
    return f"Explain the procedure for: {' '.join(title.split())}"


def build_task_rows(procedures: Sequence[Procedure], fmt: Format) -> list[FinetuneRow]:
    """One fine-tuning row per procedure, its response rendered in `fmt`."""
    _check_format(fmt)
    rows = []
    for procedure in procedures:
        sentences = sentences_from_steps(procedure.steps)
        if not sentences:
            raise FormatError(f"procedure '{procedure.title}' has no steps to render")
        rendered = render(fmt, sentences)
        meta = {"title": procedure.title, "format": fmt, "format_spans": rendered.format_spans}
        rows.append(FinetuneRow(task_instruction(procedure.title), "", rendered.text, meta))
    return rows
