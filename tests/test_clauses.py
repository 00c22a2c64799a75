"""The clause rule that both adapters use to cut streamed LLM text (no model)."""

import pytest
from hypothesis import given, settings, strategies as st

from csm_plugin.conversation.clauses import TextSplitter, split_text
from csm_plugin.errors import InputError


def test_first_clause_ends_at_clause_punctuation():
    s = TextSplitter()
    assert s.push("Sure, ") == []  # one word: shorter than min_words
    assert s.push("I can help") == []
    assert s.push(" with that; let me") == ["Sure, I can help with that;"]
    assert s.push(" check. Done") == ["let me check."]
    assert s.flush() == "Done"
    assert s.flush() is None


def test_punctuation_inside_a_word_is_not_a_boundary():
    assert split_text("It costs 1,000 dollars or 3.5 euros, roughly.") == ["It costs 1,000 dollars or 3.5 euros,", "roughly."]


def test_boundary_needs_the_next_character():
    s = TextSplitter()
    assert s.push("Well, yes,") == []  # "yes," might still be "yes,000"
    assert s.push(" and") == ["Well, yes,"]


def test_long_run_without_punctuation_is_cut_at_max_words():
    words = [f"w{i}" for i in range(30)]
    pieces = split_text(" ".join(words), max_words=12)
    assert [len(p.split()) for p in pieces] == [12, 12, 6]


def test_sentence_mode_keeps_whole_sentences():
    text = "Sure, I can help with that; let me check. One moment, please."
    assert split_text(text, "sentence") == ["Sure, I can help with that; let me check.", "One moment, please."]
    assert split_text(text) == ["Sure, I can help with that;", "let me check.", "One moment,", "please."]


@pytest.mark.parametrize("kwargs", [dict(mode="word"), dict(min_words=0), dict(max_words=True), dict(min_words=5, max_words=3)])
def test_bad_settings_are_input_errors(kwargs):
    with pytest.raises(InputError):
        TextSplitter(**kwargs)


text_parts = st.lists(st.sampled_from(["Hi", "there", ",", ".", " ", "  ", "1,5", "well", ";", "ok!", "\n", "a.b", "x"]), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text_parts, st.data(), st.sampled_from(["clause", "sentence"]), st.integers(1, 4), st.integers(0, 8))
def test_streaming_cuts_like_the_whole_text_and_loses_no_word(parts, data, mode, min_words, extra):
    text = "".join(parts)
    kwargs = dict(min_words=min_words, max_words=min_words + extra)
    whole = split_text(text, mode, **kwargs)
    # the same text pushed in arbitrary pieces
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    splitter, streamed, last = TextSplitter(mode, **kwargs), [], 0
    for cut in [*cuts, len(text)]:
        streamed += splitter.push(text[last:cut])
        last = cut
    rest = splitter.flush()
    streamed += [rest] if rest else []
    assert streamed == whole
    assert " ".join(whole).split() == text.split()
    assert all(p and p == p.strip() for p in whole)


def test_style_tag_is_split_and_carried_to_later_pieces_of_the_reply():
    from csm_plugin.conversation.styles import StyleTagCarry, split_style_tag

    assert split_style_tag("[comforting] I'm so sorry.") == ("comforting", "I'm so sorry.")
    assert split_style_tag("I'm [not] a tag") == (None, "I'm [not] a tag")
    assert split_style_tag("[two words] hi") == (None, "[two words] hi")
    carry = StyleTagCarry()
    pieces = [carry(p) for p in split_text("[calm] One moment, please. I am checking your order now.")]
    assert pieces == ["[calm] One moment,", "[calm] please. I am checking your order now."]
    # the tag is not a word: "[calm] Sure," is as short as "Sure,"
    assert split_text("[calm] Sure, I can help.") == ["[calm] Sure, I can help."]
    assert split_text("[calm] " + " ".join(["w"] * 13)) == ["[calm] " + " ".join(["w"] * 12), "w"]
    carry.reset()
    assert carry("Plain text,") == "Plain text,"
    assert carry("stays plain.") == "stays plain."
