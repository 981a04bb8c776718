"""coherence.py: the hero keeps their name, requested words are real English forms, pronouns agree."""
import random

import pytest

from coherence import glued_words, hero_kept, pronouns_agree, score_coherence
from demo_corpus import demo_record


def test_every_demo_corpus_story_holds_together():
    rng = random.Random(3)
    for _ in range(300):
        record = demo_record(rng)
        verb, noun, adjective = record["instruction"]["words"]
        scores = score_coherence(record["story"], verb, noun, adjective)
        assert scores["hero_kept"] and scores["words_well_formed"] and scores["pronouns_agree"], (scores, record["story"])


def test_a_hero_who_changes_name_is_not_kept():
    assert hero_kept("Once upon a time, there was a girl named Anna. Anna found a ring. In the end, Anna smiled.")
    assert not hero_kept("Once upon a time, there was a girl named Anna. She found a ring. "
                         "That night, Mia went to sleep with a smile on her face.")
    assert not hero_kept("Once upon a time, there was a girl named Anna. She found a ring and smiled.")  # never again
    # a friend beside the hero is no change of hero
    assert hero_kept("There once was a boy called Tim. His friend Meg was there as well. Tim and Meg played.")
    assert not hero_kept("The sun was warm. Everyone was happy.")  # no hero at all


def test_glued_verb_forms_are_not_well_formed():
    assert glued_words("Lily bakeed a cake and was bakeing all day.", ("bake", "cake", "big")) == ["bakeed", "bakeing"]
    assert glued_words("Tom cried and cryed.", ("cry", "box", "red")) == ["cryed"]
    assert glued_words("Tom cried and cried. He baked, bakes and is baking.", ("cry", "bake", "red")) == []
    # a word of the corpus is a real word, whatever it begins with (kitchen, a place, for kite)
    assert glued_words("The kite flew into the kitchen.", ("hop", "kite", "red")) == []
    assert not score_coherence("Lily bakeed a big cake.", "bake", "cake", "big")["words_well_formed"]
    assert score_coherence("Lily baked a big cake.", "bake", "cake", "big")["words_well_formed"]
    assert not score_coherence("Lily saw a big cake.", "bake", "cake", "big")["words_well_formed"]  # no form at all


def test_irregular_forms_count_as_real():
    assert score_coherence("Tom ran to the big box.", "run", "box", "big")["words_well_formed"]
    assert not score_coherence("Tom runted to the big box.", "run", "box", "big")["words_well_formed"]


@pytest.mark.parametrize("story, agrees", [
    ("Once upon a time, there was a boy named Leo. She had a red ball.", False),
    ("Once upon a time, there was a girl named Leo. He had a red ball.", False),  # Leo is a boy in the corpus
    ("Once upon a time, there was a boy named Leo. He had a red ball. His mom smiled.", True),
    ('There was a girl named Lily. "He is nice," she said about the dog.', True),  # quoted speech is free
    ("There was a puppy named Rex. He ran to the park.", True),
])
def test_pronouns_agree_with_the_hero(story, agrees):
    assert pronouns_agree(story) is agrees


def test_a_story_without_a_known_hero_is_not_scored_on_pronouns():
    assert pronouns_agree("The sun was warm, and she was happy.") is None
