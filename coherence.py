"""Does a story hold together? Three checks beside the requested words, each a yes or no per story:

- hero kept: the story's first named character (its hero) is named again later, and no other
  name of the kind the corpus gives heroes appears, so no one takes the hero's place ("a girl
  named Anna ... That night, Mia went to sleep" fails). Names are the demo corpus's: its heroes'
  names (DEMO_HEROES) fill the hero's role, its friends' names (DEMO_FRIENDS) the friend's, so a
  friend beside the hero is fine. A story with no hero name has no hero to keep and fails.
- words well formed: the requested verb appears in a real English form (base, -s, -ed, -ing by
  English spelling, or an irregular form), and no word is glued from a requested word: a word
  that begins with the word's stem is a real form, a word the demo corpus uses, or else glued
  ("bakeed", "bakeing", "runted", "cryed").
- pronouns agree: where the corpus fixes the hero's pronoun (Lily is a girl: she, her), every
  he/she/his/him/her outside quoted speech is the hero's, and the hero's kind ("a girl named
  Leo") is one the corpus gives that name. Stories without a known hero are not scored on it.

Every story of the demo corpus passes all three (tests/test_coherence.py checks 300 of them).
"""
import re
from functools import lru_cache

from demo_corpus import (ALL_DEMO_TEMPLATES, DEMO_ADJECTIVES, DEMO_FRIENDS, DEMO_HEROES, DEMO_NOUNS, DEMO_PLACES,
                         DEMO_VERBS, verb_forms)

HERO_NAMES = {name: (kind, pronoun) for name, kind, pronoun in DEMO_HEROES}
FRIEND_NAMES = set(DEMO_FRIENDS)
PRONOUNS = {"he": {"he", "his", "him"}, "she": {"she", "her"}}
KINDS = {kind for kind, _ in HERO_NAMES.values()} | {"boy", "girl"}
# the common English verbs whose past does not end in -ed (a story may use them beside the demo's)
IRREGULAR = {"run": {"ran"}, "swim": {"swam", "swum"}, "eat": {"ate", "eaten"}, "go": {"went", "gone"},
             "fly": {"flew", "flown"}, "sing": {"sang", "sung"}, "dig": {"dug"}, "hide": {"hid", "hidden"},
             "catch": {"caught"}, "throw": {"threw", "thrown"}, "draw": {"drew", "drawn"}, "see": {"saw", "seen"},
             "find": {"found"}, "make": {"made"}, "take": {"took", "taken"}, "give": {"gave", "given"},
             "ride": {"rode", "ridden"}, "sit": {"sat"}, "sleep": {"slept"}, "build": {"built"},
             "write": {"wrote", "written"}, "drink": {"drank", "drunk"}, "hold": {"held"}, "win": {"won"},
             "dream": {"dreamt"}, "spill": {"spilt"}, "spell": {"spelt"}, "sew": {"sewn"}, "cry": {"cried"},
             "come": {"came"}, "fall": {"fell", "fallen"}, "get": {"got"}, "bring": {"brought"},
             "buy": {"bought"}, "feel": {"felt"}, "keep": {"kept"}, "leave": {"left"}, "lose": {"lost"},
             "meet": {"met"}, "read": set(), "say": {"said"}, "sell": {"sold"}, "send": {"sent"},
             "shake": {"shook"}, "shine": {"shone"}, "sink": {"sank"}, "slide": {"slid"}, "spin": {"spun"},
             "stand": {"stood"}, "swing": {"swung"}, "teach": {"taught"}, "tell": {"told"}, "think": {"thought"},
             "wake": {"woke"}, "wear": {"wore"}, "blow": {"blew"}, "grow": {"grew"}, "know": {"knew"},
             "bite": {"bit"}, "climb": set(), "fight": {"fought"}, "hang": {"hung"}, "lay": {"laid"},
             "pay": {"paid"}, "shoot": {"shot"}, "sweep": {"swept"}, "weep": {"wept"}, "stick": {"stuck"}}
QUOTED = re.compile(r'"[^"]*"|\u201c[^\u201d]*\u201d')


def words(text):
    return re.findall(r"[A-Za-z]+", text)


@lru_cache(maxsize=1)
def corpus_words() -> frozenset:
    """Every word the demo corpus can write: its templates' words and every form of its word lists."""
    found = {w.lower() for template in ALL_DEMO_TEMPLATES for w in words(re.sub(r"\{\w+\}", " ", template))}
    found |= {w.lower() for name in list(HERO_NAMES) + list(FRIEND_NAMES) for w in words(name)}
    found |= set(DEMO_NOUNS) | set(DEMO_ADJECTIVES) | set(DEMO_PLACES) | KINDS
    found |= {w + "s" for w in DEMO_NOUNS} | {w + "es" for w in DEMO_NOUNS}
    for verb in DEMO_VERBS:
        found |= verb_forms(verb)
    return frozenset(found)


def real_forms(verb: str) -> set:
    return verb_forms(verb) | IRREGULAR.get(verb, set())


def stem(word: str) -> str:
    """What every regular form of a word begins with: bake -> bak, carry -> carr, climb -> climb."""
    return word[:-1] if len(word) > 3 and word[-1] in "ey" else word


def glued_words(story: str, requested) -> list:
    """The words built from a requested word that are neither its real forms nor words the corpus uses."""
    real = corpus_words()
    glued = []
    for word in {w.lower() for w in words(story)}:
        for asked in requested:
            asked = asked.lower()
            if len(asked) >= 3 and word.startswith(stem(asked)) and word not in real_forms(asked) \
                    and word not in real and word != asked:
                glued.append(word)
    return sorted(set(glued))


def hero_of(story: str):
    """The first name of the corpus's characters in the story, or None."""
    for word in words(story):
        if word in HERO_NAMES or word in FRIEND_NAMES:
            return word
    return None


def hero_kept(story: str) -> bool:
    names = [w for w in words(story) if w in HERO_NAMES or w in FRIEND_NAMES]
    if not names or names[0] not in HERO_NAMES:
        return False
    hero = names[0]
    return names.count(hero) >= 2 and not any(n in HERO_NAMES and n != hero for n in names)


def pronouns_agree(story: str):
    """True/False where the story's hero is one the corpus knows, None where it has none."""
    hero = hero_of(story)
    if hero not in HERO_NAMES:
        return None
    kind, pronoun = HERO_NAMES[hero]
    outside_quotes = [w.lower() for w in words(QUOTED.sub(" ", story))]
    other = PRONOUNS["she" if pronoun == "he" else "he"]
    if any(w in other for w in outside_quotes):
        return False
    named_kind = re.search(rf"\b(\w+(?: cub)?) (?:named|called) {hero}\b", story)
    return not (named_kind and named_kind.group(1) in KINDS and named_kind.group(1) != kind)


def score_coherence(story: str, verb: str, noun: str, adjective: str) -> dict:
    """The three checks for one story (pronouns_agree None: no known hero to agree with)."""
    story_words = {w.lower() for w in words(story)}
    glued = glued_words(story, (verb, noun, adjective))
    return {"hero_kept": hero_kept(story),
            "words_well_formed": bool(story_words & real_forms(verb.lower())) and not glued,
            "glued_words": glued,
            "pronouns_agree": pronouns_agree(story)}


def hero_name_ids(tokenizer) -> list:
    """The token ids of each hero name of the demo corpus, as a story spells it mid-sentence."""
    return [tuple(tokenizer.encode(name)) for name in HERO_NAMES]
