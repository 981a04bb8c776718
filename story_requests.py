"""What evaluate.py asks a model and how it scores the answers: a Request (three words and
features), where requests come from (a JSON lines file, a corpus shard's metadata, or drawn from
the demo word lists and held out from the training triples), and score_story.

Each prompt asks for a verb, a noun and an adjective (and maybe
features). A story uses a word when one of its lower-cased words is: for the verb, the base
form or a regular inflection (climb, climbs, climbed, climbing; hop -> hopped, carry ->
carried: demo_corpus.verb_forms); for the noun, the noun or its regular plural (noun_forms:
hat -> hats, never "hates"); for the adjective, the adjective itself. A word in both demo lists
(watch, rock, brush...) counts for the role the prompt asks for, in that role's forms only: the
noun brush is not used by "brushed". A Dialogue story must contain quoted speech ("..." or curly
quotes). Irregular forms (ran, went) do not count here; coherence.py, which scores whether the
story holds together, takes them as real English.
"""
import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import List

from cli import UsageError
from coherence import score_coherence
from demo_corpus import DEMO_ADJECTIVES, DEMO_NOUNS, DEMO_VERBS, verb_forms
from prompts import FEATURE_PHRASES, build_prompt, canonical_feature

QUOTED_SPEECH = re.compile(r'"[^"\n]{2,}"|\u201c[^\u201d\n]{2,}\u201d')


@dataclass
class Request:
    verb: str
    noun: str
    adjective: str
    features: List[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return build_prompt(self.verb, self.noun, self.adjective, self.features)


def requests_from_file(path: str) -> List[Request]:
    if not os.path.isfile(path):
        raise UsageError(f"--prompts_file={path}: no such file")
    requests = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                features = [canonical_feature(x) for x in obj.get("features", [])]
                requests.append(Request(str(obj["verb"]), str(obj["noun"]), str(obj["adjective"]), features))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UsageError(f"--prompts_file={path} line {line_no}: expected a JSON object with "
                                 f"verb, noun, adjective and optional features ({exc})") from None
    if not requests:
        raise UsageError(f"--prompts_file={path}: holds no prompts (expected JSON lines of verb, noun, adjective)")
    return requests


def requests_from_shard(path: str, n: int, seed: int) -> List[Request]:
    """Prompts from a corpus shard's instruction metadata (the validation shard, data00.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--prompts_shard={path}: not a readable JSON shard ({exc})") from None
    requests = []
    for rec in records:
        instruction = rec.get("instruction") if isinstance(rec, dict) else None
        words = instruction.get("words") if isinstance(instruction, dict) else None
        if isinstance(words, list) and len(words) == 3 and all(isinstance(w, str) and w for w in words):
            try:
                requests.append(Request(*words, [canonical_feature(x) for x in instruction.get("features", [])]))
            except ValueError:
                continue
    if not requests:
        raise UsageError(f"--prompts_shard={path}: no record with instruction words to make a prompt of")
    random.Random(seed).shuffle(requests)
    return requests[:n]


def seen_word_triples(data_dir: str) -> set:
    """Every (verb, noun, adjective) in the training shards (data01 onwards) of a corpus."""
    shards = sorted(glob.glob(os.path.join(data_dir, "TinyStories_all_data", "data*.json")))[1:]
    if not shards:
        raise UsageError(f"--held_out_from={data_dir}: no training shards TinyStories_all_data/data01.json...")
    seen = set()
    for path in shards:
        try:
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--held_out_from: {path} is not a readable JSON shard ({exc})") from None
        for rec in records:
            words = (rec.get("instruction") or {}).get("words") if isinstance(rec, dict) else None
            if isinstance(words, list) and len(words) == 3 and all(isinstance(w, str) for w in words):
                seen.add(tuple(w.lower() for w in words))
    return seen


def held_out_requests(n: int, seed: int, seen: set) -> List[Request]:
    """Random prompts from the demo word lists whose word triple never appears in training;
    half ask for a dialogue, a quarter for one other feature as well."""
    rng = random.Random(seed)
    requests, used = [], set()
    while len(requests) < n:
        triple = (rng.choice(DEMO_VERBS), rng.choice(DEMO_NOUNS), rng.choice(DEMO_ADJECTIVES))
        if triple in seen or triple in used:
            continue
        used.add(triple)
        features = ["Dialogue"] if rng.random() < 0.5 else []
        if rng.random() < 0.25:
            features.append(rng.choice([f for f in FEATURE_PHRASES if f != "Dialogue"]))
        requests.append(Request(*triple, features))
    return requests


def story_words(story: str) -> set:
    return set(re.findall(r"[a-z]+", story.lower()))


def noun_forms(noun: str) -> set:
    """{noun, its plural} by the regular English spelling rules: box boxes, dish dishes, berry
    berries, leaf leaves (or leafs), knife knives, potato potatoes (or pianos); otherwise -s. So
    hat matches hats, never "hates"."""
    noun = noun.lower()
    if re.search(r"(s|x|z|ch|sh)$", noun):
        plurals = {noun + "es"}
    elif re.search(r"[^aeiou]y$", noun):
        plurals = {noun[:-1] + "ies"}
    elif noun.endswith("fe"):
        plurals = {noun[:-2] + "ves", noun + "s"}
    elif noun.endswith("f"):
        plurals = {noun[:-1] + "ves", noun + "s"}
    elif re.search(r"[^aeiou]o$", noun):
        plurals = {noun + "es", noun + "s"}
    else:
        plurals = {noun + "s"}
    return {noun} | plurals


def score_story(story: str, request: Request) -> dict:
    words = story_words(story)
    found = {"verb_used": bool(words & verb_forms(request.verb.lower())),
             "noun_used": bool(words & noun_forms(request.noun)),
             "adjective_used": request.adjective.lower() in words}
    found["all_words"] = all(found.values())
    if "Dialogue" in request.features:
        found["dialogue"] = bool(QUOTED_SPEECH.search(story))
    return {**found, **score_coherence(story, request.verb, request.noun, request.adjective)}
