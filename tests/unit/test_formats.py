"""Study B's format transforms: same content in every format, exact round trips, exact spans."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from harness.data import registry as data
from harness.data import formats
from harness.data.registry import Procedure
from harness.data.formats import FORMATS, FormatError, parse, procedure_sentences, render

DATA_DIR = data.resolve_data_dir()


@pytest.fixture(scope="module")
def procedures() -> list[Procedure]:
    assert DATA_DIR is not None, "shared data directory not found (set HARNESS_DATA_DIR)"
    return data.load_procedures(DATA_DIR)


def content_of(fmt: str, sentence: str) -> str:
    """What a sentence looks like inside the rendered text (json escapes it)."""
    return json.dumps(sentence, ensure_ascii=False)[1:-1] if fmt == "json" else sentence


def assert_spans_partition(fmt: str, sentences: list[str], rendered: formats.Rendered) -> None:
    """format_spans and content_spans tile the text; outside format_spans lie exactly the sentences."""
    text = rendered.text
    spans = sorted([(*s, "format") for s in rendered.format_spans] + [(*s, "content") for s in rendered.content_spans])
    position = 0
    for start, end, _ in spans:
        assert start == position and end >= start
        position = end
    assert position == len(text)
    assert all(end > start for start, end in rendered.format_spans)
    in_format = set()
    for start, end in rendered.format_spans:
        in_format.update(range(start, end))
    outside = "".join(ch for i, ch in enumerate(text) if i not in in_format)
    assert outside == "".join(content_of(fmt, s) for s in sentences)
    assert [text[a:b] for a, b in rendered.content_spans] == [content_of(fmt, s) for s in sentences]


# --- sentences ---------------------------------------------------------------------------------


def test_procedure_sentences_rule():
    text = (
        "1. Open  Settings.\u00a0 \n\n"
        "2. Tap General. A menu opens!\n"
        "3.  Tap \"About.\" Then wait\n"
        "4. Use 1.5 cups, e.g. Brown sugar, from www.example.com. Mix 1 tsp. (5 ml) salt.\n"
        "5. Android:\n"
        "6. Stir. then rest?\n"
        " • 2 eggs"
    )
    assert procedure_sentences(text) == [
        "Open Settings.",
        "Tap General.",
        "A menu opens!",
        'Tap "About."',
        "Then wait.",  # step lacked terminal punctuation: "." added
        "Use 1.5 cups, e.g. Brown sugar, from www.example.com.",  # abbreviation and decimals kept whole
        "Mix 1 tsp. (5 ml) salt.",
        "Android:.",
        "Stir. then rest?",  # a lowercase letter never starts a sentence
        "2 eggs.",
    ]
    assert procedure_sentences("") == []
    assert formats.split_sentences("  A b.  C d!\nE f") == ["A b.", "C d!", "E f"]


def test_step_starting_lowercase_joins_the_previous_sentence():
    # the documented price of exact prose round trips: prose cannot mark this boundary
    assert formats.sentences_from_steps(["Open Settings.", "iCloud is listed."]) == ["Open Settings. iCloud is listed."]


def test_every_sentence_is_terminated_and_normalised(procedures):
    for procedure in procedures:
        sentences = formats.sentences_from_steps(procedure.steps)
        assert sentences, procedure.title
        formats.check_sentences(sentences)
        # no content is lost or invented: sentences are the terminated steps, re-cut
        assert " ".join(sentences) == " ".join(formats._terminated(step) for step in procedure.steps)


# --- round trips and spans on the real data ----------------------------------------------------


def test_every_wikihow_procedure_round_trips_in_every_format(procedures):
    for procedure in procedures:
        sentences = formats.sentences_from_steps(procedure.steps)
        for fmt in FORMATS:
            rendered = render(fmt, sentences)
            assert parse(fmt, rendered.text) == sentences, (procedure.title, fmt)
            assert [formats.is_valid(other, rendered.text) for other in FORMATS] == [o == fmt for o in FORMATS]


def test_spans_partition_every_wikihow_procedure(procedures):
    for procedure in procedures:
        sentences = formats.sentences_from_steps(procedure.steps)
        for fmt in FORMATS:
            assert_spans_partition(fmt, sentences, render(fmt, sentences))


def test_render_shapes():
    sentences = ['Say "hi" to C:\\Users.', "Done!"]
    prose, bullets, as_json = (render(fmt, sentences) for fmt in FORMATS)
    assert prose.text == 'Say "hi" to C:\\Users. Done!' and prose.format_spans == [(21, 22)]
    assert bullets.text == '- Say "hi" to C:\\Users.\n- Done!'
    assert bullets.format_spans == [(0, 2), (23, 26)]
    assert as_json.text == json.dumps({"procedure": sentences}, ensure_ascii=False)
    assert as_json.text == '{"procedure": ["Say \\"hi\\" to C:\\\\Users.", "Done!"]}'
    assert [as_json.text[a:b] for a, b in as_json.format_spans] == ['{"procedure": ["', '", "', '"]}']
    assert render("prose", ["One."]).format_spans == []


# --- property tests on generated sentences -----------------------------------------------------

# Quotes, backslashes and a control character exercise JSON escaping; whitespace is left to the
# join (arbitrary whitespace is covered by the arbitrary-list test below).
WORD_CHARS = st.sampled_from(list('abcXYZ019.,!?:;"\'()[]{}\\/-•é½“”’…') + ["\u0001"])
WORDS = st.text(WORD_CHARS, min_size=1, max_size=8)


@st.composite
def sentence(draw) -> str:
    """A sentence shaped like WikiHow text: capitalised first word, words, terminal punctuation."""
    first = draw(st.sampled_from(["Tap", "Open", "A", "3", '"Go', "Élan", "(Optional)"]))
    words = draw(st.lists(WORDS, max_size=6))
    end = draw(st.sampled_from([".", "!", "?", "…", '."', ".)", "!”"]))
    return " ".join([first, *words]) + end


@settings(max_examples=300, deadline=None)
@given(st.lists(sentence(), min_size=1, max_size=6))
@example(['Say "hi" to C:\\Users.', "Bell \u0001 rings."])
def test_generated_sentences_round_trip_with_exact_spans(sentences):
    try:
        formats.check_sentences(sentences)
    except FormatError:
        assume(False)  # not a sentence list the transforms accept: rejecting it is the contract
    for fmt in FORMATS:
        rendered = render(fmt, sentences)
        assert parse(fmt, rendered.text) == sentences
        assert_spans_partition(fmt, sentences, rendered)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=5))
def test_render_either_rejects_or_round_trips_arbitrary_lists(sentences):
    for fmt in FORMATS:
        try:
            rendered = render(fmt, sentences)
        except FormatError:
            continue
        assert parse(fmt, rendered.text) == sentences


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_valid_in_at_most_one_format(text):
    assert sum(formats.is_valid(fmt, text) for fmt in FORMATS) <= 1


# --- invalid input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("list", ""),
        ("list", "- Open it.\nClose it."),
        ("list", "Here are the steps:\n- Open it."),
        ("list", "-Open it."),
        ("list", "- Open it.\n- "),
        ("json", ""),
        ("json", '{"procedure": ["Open it."]'),
        ("json", '["Open it."]'),
        ("json", '{"steps": ["Open it."]}'),
        ("json", '{"procedure": "Open it."}'),
        ("json", '{"procedure": []}'),
        ("json", '{"procedure": ["Open it.", 3]}'),
        ("json", '```json\n{"procedure": ["Open it."]}\n```'),
        ("prose", ""),
        ("prose", "  \n "),
        ("prose", "- Open it.\n- Close it."),
        ("prose", '{"procedure": ["Open it."]}'),
    ],
)
def test_invalid_texts_parse_to_none(fmt, text):
    assert parse(fmt, text) is None
    assert not formats.is_valid(fmt, text)


def test_lenient_where_documented():
    assert parse("list", "  - Open  it.\n\n- Close it.  \r\n") == ["Open it.", "Close it."]
    assert parse("json", ' {"procedure": ["a"], "note": 1}\n') == ["a"]
    assert parse("prose", "Open it.\n\nClose it.") == ["Open it.", "Close it."]


@pytest.mark.parametrize(
    "sentences",
    [[], ["Open it"], ["Open it.\nClose it."], ["Open it. Close it."], ["Open  it."], [" Open it."],
     ["- Open it."], ["Mix 1 tsp.", "Salt."], ["Open it.", "then close it."], ["Open it.", ""]],
)  # fmt: skip
def test_render_rejects_sentences_that_would_not_round_trip(sentences):
    for fmt in FORMATS:
        with pytest.raises(FormatError):
            render(fmt, sentences)


def test_unknown_format_is_an_error():
    with pytest.raises(FormatError, match="xml"):
        render("xml", ["Open it."])
    with pytest.raises(FormatError, match="xml"):
        parse("xml", "Open it.")


# --- fine-tuning rows --------------------------------------------------------------------------


def test_build_task_rows_same_content_every_format(procedures):
    sample = procedures[:200]
    by_format = {fmt: formats.build_task_rows(sample, fmt) for fmt in FORMATS}
    for i, procedure in enumerate(sample):
        rows = [by_format[fmt][i] for fmt in FORMATS]
        assert {row.instruction for row in rows} == {f"Explain the procedure for: {procedure.title}"}
        assert all(row.input == "" for row in rows)
        contents = [parse(fmt, row.response) for fmt, row in zip(FORMATS, rows)]
        assert contents[0] == contents[1] == contents[2] == formats.sentences_from_steps(procedure.steps)
        for fmt, row in zip(FORMATS, rows):
            assert row.meta == {
                "title": procedure.title,
                "format": fmt,
                "format_spans": render(fmt, contents[0]).format_spans,
            }
    with pytest.raises(FormatError, match="Empty"):
        formats.build_task_rows([Procedure("Empty", [])], "list")
    assert formats.task_instruction("  Zoom  in ") == "Explain the procedure for: Zoom in"
