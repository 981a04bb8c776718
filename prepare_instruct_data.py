"""Instruction prompts for story writing: the one prompt builder that data preparation,
generation and evaluation all use, so training and sampling prompts never drift apart."""
from typing import Iterable, Optional

# TinyStories feature name -> the phrase the README-style template uses
FEATURE_PHRASES = {
    "Dialogue": "it should contain a dialogue",
    "BadEnding": "it should have a bad ending",
    "Conflict": "it should have a conflict",
    "Foreshadowing": "it should use foreshadowing",
    "Twist": "it should have a plot twist",
    "MoralValue": "it should teach a moral value",
}
_FEATURE_LOOKUP = {name.lower().replace("_", ""): name for name in FEATURE_PHRASES}


def canonical_feature(name: str) -> str:
    """'dialogue', 'bad_ending', 'BadEnding' -> the TinyStories spelling; ValueError otherwise."""
    key = name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in _FEATURE_LOOKUP:
        raise ValueError(f"unknown feature {name!r} (expected one of {', '.join(FEATURE_PHRASES)})")
    return _FEATURE_LOOKUP[key]


def build_prompt(verb: str, noun: str, adjective: str, features: Optional[Iterable[str]] = ()) -> str:
    """The README prompt: 'Write a story. In the story, try to use the verb "climb", the noun
    "ring" and the adjective "messy". The story has the following features: it should contain
    a dialogue. Possible story:' (the features sentence is left out when there are none)."""
    prompt = (f'Write a story. In the story, try to use the verb "{verb}", the noun "{noun}" '
              f'and the adjective "{adjective}".')
    phrases = [FEATURE_PHRASES[canonical_feature(f)] for f in (features or ())]
    if phrases:
        prompt += " The story has the following features: " + ", ".join(phrases) + "."
    return prompt + " Possible story:"


def rewrite_original_prompt(gpt_prompt: str) -> str:
    """The original instruct storyteller's rewriting of a TinyStories GPT prompt, in its order."""
    text = gpt_prompt.replace(
        "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year "
        "old child would understand.", "Write a story.")
    text = text.replace(" Remember to only use simple words!", "")
    text = text.replace("\n\nPossible story:", "")
    text = text.replace("try to at some point use", "try to use")
    return text + " Possible story:"
