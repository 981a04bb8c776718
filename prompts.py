"""The prompt format: the one place that words an instruction and lays it out in tokens, so
that data preparation, generation, evaluation and the demo corpus never drift apart.

Template prompts (the original instruct storyteller's README wording, docs/formats.md "Prompts"):

    Write a story. In the story, try to use the verb "climb", the noun "ring" and the adjective
    "messy". The story has the following features: it should contain a dialogue. Possible story:

An instruct model reads the prompt's tokens, then BOS, which opens the story; the story ends
with EOS. A plain (pretrained) model reads BOS first, then the text it continues.
"""
import re
from typing import Iterable, List, Optional, Tuple

# The TinyStories feature names and the template's phrase for each. The order matters:
# evaluate.py draws held-out prompts' features from it with a seeded generator.
FEATURE_PHRASES = {
    "Dialogue": "it should contain a dialogue",
    "BadEnding": "it should have a bad ending",
    "Conflict": "it should have a conflict",
    "Twist": "it should have a plot twist",
    "MoralValue": "it should teach a moral value",
    "Foreshadowing": "it should use foreshadowing",
}
_FEATURE_LOOKUP = {name.lower(): name for name in FEATURE_PHRASES}

# How the archive's GPT-4 prompts word each feature (the demo corpus writes such prompts;
# the "original" prompt style rewrites them)
GPT_FEATURE_PHRASES = {
    "Dialogue": "the story should contain at least one dialogue",
    "BadEnding": "the story has a bad ending",
    "Conflict": "the story has some sort of conflict",
    "Foreshadowing": "the narrative uses foreshadowing or setup and payoff",
    "Twist": "something unexpected happens / there is at least one plot twist",
    "MoralValue": "the story has a moral value",
}

PROMPT_STYLES = ("template", "original")
SKIP_REASONS = ("not_a_record", "no_story", "empty_story", "no_instruction", "bad_words",
                "bad_features", "unknown_feature", "no_prompt")


def canonical_feature(name: str) -> str:
    """'dialogue', 'bad_ending', 'BadEnding' -> the TinyStories spelling; ValueError otherwise."""
    key = name.strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in _FEATURE_LOOKUP:
        raise ValueError(f"unknown feature {name!r} (expected one of {', '.join(FEATURE_PHRASES)})")
    return _FEATURE_LOOKUP[key]


def build_prompt(verb: str, noun: str, adjective: str, features: Optional[Iterable[str]] = ()) -> str:
    """The template prompt; the features sentence is left out when there are none."""
    prompt = (f'Write a story. In the story, try to use the verb "{verb}", the noun "{noun}" '
              f'and the adjective "{adjective}".')
    phrases = [FEATURE_PHRASES[canonical_feature(f)] for f in (features or ())]
    if phrases:
        prompt += " The story has the following features: " + ", ".join(phrases) + "."
    return prompt + " Possible story:"


def gpt_prompt(verb: str, noun: str, adjective: str, features) -> str:
    """A prompt worded as the archive's GPT-4 prompts are."""
    prompt = ("Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year old "
              f'child would understand. The story should use the verb "{verb}", the noun "{noun}" and '
              f'the adjective "{adjective}".')
    if features:
        prompt += " The story has the following features: " + ", ".join(
            GPT_FEATURE_PHRASES[f] for f in features) + "."
    return prompt + " Remember to only use simple words!\n\nPossible story:"


def rewrite_original_prompt(gpt_prompt_text: str) -> str:
    """The original instruct storyteller's rewriting of a TinyStories GPT prompt, in its order:
    the opening sentence becomes "Write a story.", the reminder and the trailing "Possible
    story:" go, GPT-3.5's "try to at some point use" becomes "try to use", and " Possible
    story:" is appended."""
    text = gpt_prompt_text.replace(
        "Write a short story (3-5 paragraphs) which only uses very simple words that a 3 year "
        "old child would understand.", "Write a story.")
    text = text.replace(" Remember to only use simple words!", "")
    text = text.replace("\n\nPossible story:", "")
    text = text.replace("try to at some point use", "try to use")
    return text + " Possible story:"


def record_prompt_and_story(record, prompt_style):
    """(prompt, stripped story, None) for a usable corpus record, else (None, None, skip reason)."""
    if not isinstance(record, dict):
        return None, None, "not_a_record"
    story = record.get("story")
    if not isinstance(story, str):
        return None, None, "no_story"
    story = story.strip()
    if not story:
        return None, None, "empty_story"
    instruction = record.get("instruction")
    if not isinstance(instruction, dict):
        return None, None, "no_instruction"
    if prompt_style == "original":
        gpt_text = instruction.get("prompt:")  # the archive's key really has the colon
        if not isinstance(gpt_text, str) or not gpt_text.strip():
            return None, None, "no_prompt"
        return rewrite_original_prompt(gpt_text), story, None
    words = instruction.get("words")
    if (not isinstance(words, list) or len(words) != 3
            or not all(isinstance(w, str) and w.strip() for w in words)):
        return None, None, "bad_words"
    features = instruction.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        return None, None, "bad_features"
    try:
        prompt = build_prompt(words[0].strip(), words[1].strip(), words[2].strip(), features)
    except ValueError:
        return None, None, "unknown_feature"
    return prompt, story, None


# How an instruct prompt's text becomes tokens. "story_words", this toolkit's: each quoted word
# is encoded as a story spells it, after a space, so its first piece carries sentencepiece's "▁"
# ('"dragon"' alone gives d ra g on; a story's "dragon" gives ▁d ra g on). Then the prompt holds
# the very tokens the story must copy, which a fine-tune learns far sooner than a piece-by-piece
# translation (docs/finetuning.md). "plain": the text as it is, as the original instruct
# storyteller and this toolkit's data before the rule were encoded. Instruct data records its
# encoding in meta.json, a checkpoint in its config; generation reads it from there.
PROMPT_ENCODINGS = ("story_words", "plain")
_QUOTED_WORD = re.compile(r'"([^"\s][^"]*)"')


def story_spelled_quotes(text: str) -> str:
    """'the verb "climb"' -> 'the verb " climb"': the text a story_words prompt is encoded from."""
    return _QUOTED_WORD.sub(r'" \1"', text)


# The same two steps as a chat template, the Jinja text that Hugging Face's apply_chat_template
# and llama.cpp's chat completion render (exports store it: tokenizer_config.json's chat_template,
# the GGUF's tokenizer.chat_template), so that other tools lay a chat's user message out as
# prompt_ids does: the last user message, encoded as its data was, then BOS, which the tool's
# tokenizer reads as the special token. Nothing comes before it, so the export must not add BOS
# in front. For story_words the template walks the text's quotes as _QUOTED_WORD's scan does
# (Jinja has no regular expressions): a quote opens a word when a piece follows that is not
# empty, does not start with a space and is closed by the next quote; then the word gets its
# leading space and the closing quote is passed over. tests/test_prompt_format.py checks the
# rendering against story_spelled_quotes on arbitrary text.
_LAST_USER_MESSAGE = (
    "{%- set chat = namespace(prompt='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set chat.prompt = message['content'] -%}{%- endif -%}"
    "{%- endfor -%}")
_STORY_SPELLED_LAST_USER_MESSAGE = _LAST_USER_MESSAGE + (
    "{%- set pieces = chat.prompt.split('\"') -%}"
    "{%- set quote = namespace(open=false) -%}"
    "{{- pieces[0] -}}"
    "{%- for piece in pieces[1:] -%}"
    "{%- if quote.open -%}{{- '\"' + piece -}}{%- set quote.open = false -%}"
    "{%- elif piece and piece == piece.lstrip() and not loop.last -%}"
    "{{- '\" ' + piece -}}{%- set quote.open = true -%}"
    "{%- else -%}{{- '\"' + piece -}}{%- endif -%}"
    "{%- endfor -%}")
CHAT_TEMPLATES = {"story_words": _STORY_SPELLED_LAST_USER_MESSAGE + "{{- bos_token -}}",
                  "plain": _LAST_USER_MESSAGE + "{{- chat.prompt + bos_token -}}"}


def chat_template(record: dict) -> Optional[str]:
    """The chat template for a prompt format (see CHAT_TEMPLATES); None for a plain model, whose
    prompt is text to continue."""
    return CHAT_TEMPLATES[record["prompt_encoding"]] if record["is_instruct"] else None


def prompt_ids(tokenizer, text: str, instruct: bool, encoding: str = "story_words") -> List[int]:
    """The tokens a model reads before its story, as in training: an instruct model reads the
    prompt (encoded as its data was, see PROMPT_ENCODINGS), then BOS opens the story; a plain
    model reads BOS, then the text it continues."""
    if not text:
        return [tokenizer.bos_id]
    if instruct:
        if encoding not in PROMPT_ENCODINGS:
            raise ValueError(f"prompt encoding {encoding!r}: expected one of {', '.join(PROMPT_ENCODINGS)}")
        encoded = story_spelled_quotes(text) if encoding == "story_words" else text
        return tokenizer.encode(encoded) + [tokenizer.bos_id]
    return tokenizer.encode(text, bos=True)


# The prompt format: the one record of how a model reads its prompt. It travels from the
# instruct data's meta.json into every checkpoint's config and every export (the Hugging Face
# config.json, GGUF metadata, a JSON file beside a llama2.c .bin), and the loader reads it back.
# A plain model's prompt_encoding is None: its prompt is text to continue, never encoded apart.
PROMPT_FORMAT_KEY = "prompt_format"


def prompt_format(is_instruct: bool, prompt_encoding: Optional[str] = None) -> dict:
    """{"is_instruct": bool, "prompt_encoding": one of PROMPT_ENCODINGS, or None when not instruct}."""
    if not is_instruct:
        return {"is_instruct": False, "prompt_encoding": None}
    if prompt_encoding not in PROMPT_ENCODINGS:
        raise ValueError(f"prompt_encoding {prompt_encoding!r}, expected one of {', '.join(PROMPT_ENCODINGS)}")
    return {"is_instruct": True, "prompt_encoding": prompt_encoding}


def read_prompt_format(record) -> dict:
    """A prompt format as a file holds it, checked (ValueError saying what is wrong)."""
    if not isinstance(record, dict) or not isinstance(record.get("is_instruct"), bool):
        raise ValueError(f"prompt_format {record!r}, expected "
                         f'{{"is_instruct": true or false, "prompt_encoding": ...}}')
    return prompt_format(record["is_instruct"], record.get("prompt_encoding"))


def override_prompt_format(record: dict, instruct: Optional[bool] = None, encoding: Optional[str] = None) -> dict:
    """--instruct / --no-instruct and --prompt_encoding over what a file records, for files made
    elsewhere. --prompt_encoding implies --instruct; --instruct alone on a file that records no
    encoding reads the text plain, as the original instruct storyteller's checkpoints do."""
    if encoding is not None and instruct is False:
        raise ValueError("--prompt_encoding says how an instruct prompt is encoded: drop --no-instruct")
    is_instruct = record["is_instruct"] if instruct is None else instruct
    return prompt_format(is_instruct or encoding is not None, encoding or record["prompt_encoding"] or "plain")


class RequestFinder:
    """Where a prompt's requests sit in its token ids, for one tokenizer. A story_words prompt
    lays out each requested word between quote pieces (`▁"` `▁d ra g on` `",`), and asks for a
    dialogue with the word "dialogue" (both prompt styles do)."""

    def __init__(self, tokenizer):
        pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
        self.opening = frozenset(i for i, p in enumerate(pieces) if p in ('"', '\u2581"'))
        self.closing = frozenset(i for i, p in enumerate(pieces) if p.startswith('"'))
        self.speech = frozenset(i for i, p in enumerate(pieces) if '"' in p)  # a story's dialogue
        self.dialogue = tuple(tokenizer.encode("dialogue"))

    def words(self, ids: List[int]) -> List[Tuple[int, ...]]:
        """The token sequences of the quoted words in a prompt's ids."""
        words, start = [], None
        for i, token in enumerate(ids):
            if start is None and token in self.opening:
                start = i + 1
            elif start is not None and token in self.closing:
                if i > start:
                    words.append(tuple(ids[start:i]))
                start = None
        return words

    def asks_for_dialogue(self, ids: List[int]) -> bool:
        n = len(self.dialogue)
        return any(tuple(ids[i:i + n]) == self.dialogue for i in range(len(ids) - n + 1))
