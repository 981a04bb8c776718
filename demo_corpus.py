"""An offline demo corpus in the TinyStories archive's format (`python tinystories.py
make_demo`): procedurally written stories, each with the GPT-4-style instruction metadata
(words, features, prompt) that prepare_instruct_data.py turns into instruction examples.

The three instruction words appear in a story only because the instruction asked for them:
the fixed text of the templates uses none of the list words (tests check this), so a model
that writes the requested words has learned to follow the instruction, not the templates.
"""
import os
import random
import re

from cli import progress as tqdm  # a plain line every 10% when the output is a log file

from cli import write_json
from data_paths import shards_dir
from prompts import GPT_FEATURE_PHRASES, gpt_prompt

DEMO_VERBS = sorted(set("""
add agree answer bake bark bathe beg blink bloom boil borrow bounce bow brush bubble
bump buzz camp carry chase chat check cheer chew chop clap clean climb clip close collect
color comb cook copy count crack crash crawl cross crunch cuddle dance dash decorate deliver
discover doodle drag dream dress drip drop drum dry dust enjoy explore fan fetch fill fish
fix fizz flap flash flip float fold follow fry gather giggle glow grab greet growl gulp
guess hammer hatch hook hop hope hug hum hunt hurry invite jingle jog join juggle jump kick
kiss knit knock lick lift load lock mark march melt mend mix mop munch nap nibble nod nudge
obey open order pack paddle paint park pass pat peek peel pet pick pinch plan plant plop
point poke polish pop pounce pour practice prance press pretend print pull pump purr push
quack race rake rattle reach relax remember reply rescue rest return roar rock roll row rub
rush rustle sail save scatter scoop scream scrub search sew shiver shout sigh sip skate skid
skip sled slip slurp smell snack snap sneeze sniff snore snuggle soar sort sparkle spell
spill splash spray sprinkle squeak squeeze squint squish stack stamp stare start step
stir stomp stop stretch stroll stuff surf swap swirl tag tap taste tickle tidy tip toss touch
tow trace trim trip trot tuck tug tumble twirl unlock unpack visit wag walk wander
wash watch water wave whirl whisper whistle wiggle wink wipe wish wobble wonder wrap yawn yell
yelp zip zoom
""".split()))

DEMO_NOUNS = sorted(set("""
acorn airplane anchor ant apple apron arrow axe backpack badge bag ball balloon banana bandage
basket bat beach bead bean bee bell belt bench berry bike bird blanket block boat bone
book boot bottle bowl box bracelet branch bridge broom brush bucket bug bus butterfly button
cake camel camera candle cap car card carrot castle cat cave chair cherry chicken clock cloud
clown coat coin comb cookie cow crab crayon crown cup cupcake deer desk dinosaur doll dolphin
donkey door dragon drum duck eagle egg elephant fairy feather fence flag flower flute fork fox
frog gate ghost giraffe glove goat goose grape guitar hammer hat helmet hen hill horse
jacket jar jeep kangaroo kettle key kite koala ladder lamp leaf lemon letter lion lizard lock
log lollipop map marble medal melon mirror mitten monkey moon mop mouse muffin mushroom nest
net notebook nut octopus orange owl paddle pail pan pancake parrot peach pear pebble pen pencil
penguin piano pie pig pillow pizza plane plate plum pony pot potato puddle pumpkin puppet
puzzle rabbit radio rainbow ribbon ring robot rock rocket rope rose ruler sandwich scarf seal
seed shark sheep shell ship shoe shovel sled slide snail snake snowman sock sofa spider spoon
squirrel star sticker stone stool strawberry sweater swing table teapot teddy tent tiger tomato
towel tower toy tractor train truck trumpet turtle umbrella vase violin wagon wallet wand
watch whale wheel whistle window wolf worm zebra
""".split()))

DEMO_ADJECTIVES = sorted(set("""
adorable angry awesome bald beautiful bouncy bright brilliant broken brown bumpy busy calm
careful cheerful chewy clean clever cloudy clumsy colorful comfy cool cozy crispy crunchy cuddly
curious curly cute damp dark dirty dizzy dusty eager early elegant empty enormous excited
fancy fantastic fast fierce fine fluffy foggy fragile free fresh friendly frozen funny furry
fuzzy gentle giant gigantic gloomy glossy golden gorgeous grassy gray green greedy grumpy
hairy handsome heavy helpful hollow hot huge hungry icy itchy jolly juicy lazy leafy light
lively lonely loose loud lovely lucky magic messy mighty moldy muddy narrow naughty neat
new noisy orange pale patient peaceful pink plain playful plump polite poor precious
pretty proud puffy purple quick quiet rainy rare red rich ripe rocky rough round royal rusty
salty sandy scary shaggy sharp shiny short shy silly silver slimy slippery slow small smelly
smooth snowy soft soggy sour sparkly special spicy spiky spooky spotty squeaky squishy steep
sticky stinky stormy strange striped strong sturdy sunny super sweet swift tall tame tasty thick
thin thirsty tidy tiny tough twinkly ugly warm wavy weak wet white wide wild windy wise
wobbly wooden woolly yellow young yummy zany
brave chubby chilly creamy dreamy frosty gooey lumpy merry misty rosy shaky sleepy sneaky
starry toasty tricky wrinkly bossy jumpy
""".split()))

# A feature's sentences are recognisable by these patterns, which no other template uses.
DEMO_FEATURE_MARKERS = {
    "Dialogue": r'"',
    "BadEnding": r"\bsad(ly)?\b",
    "Conflict": r"\bproblem\b|\bfight\b",
    "Foreshadowing": r"\bknow\b",
    "Twist": r"\bsurprise\b",
    "MoralValue": r"\blearned\b|\blesson\b",
}

DEMO_HEROES = (  # (name, kind, pronoun)
    [(name, "girl", "she") for name in """Lily Mia Sue Amy Anna Emma Lucy Sara Zoe Kim Ella Daisy
                                          Molly Ruby Grace Ava Nora Maya Ivy Jill""".split()]
    + [(name, "boy", "he") for name in """Tim Ben Tom Max Sam Jack Leo Jake Joe Bob Dan Finn Luke
                                          Noah Owen Eli Ned Toby Zack Adam""".split()]
    + [("Pip", "bunny", "he"), ("Rex", "puppy", "he"), ("Kitty", "kitten", "she"), ("Fluff", "kitten", "he"),
       ("Coco", "bunny", "she"), ("Buddy", "puppy", "he"), ("Rosie", "piglet", "she"), ("Chirp", "chick", "she"),
       ("Benny", "bear cub", "he"), ("Dot", "ladybird", "she"), ("Hoot", "owlet", "he"), ("Wally", "duckling", "he")])
DEMO_FRIENDS = ["Mom", "Dad", "Grandma", "Grandpa", "Ted", "Jen", "Liz", "Ron", "Meg", "Pam", "Ken",
                "Kate", "Nick", "Rita", "Olly", "Hugo", "Tess", "Gus", "Bea", "Milo"]
DEMO_PLACES = ["garden", "forest", "yard", "lake", "zoo", "school", "playground", "meadow", "river",
               "town", "kitchen", "backyard", "jungle", "field", "market", "farm", "woods", "street"]

# Templates: {name} hero, {He}/{he}/{His}/{his}/{him} pronouns, {kind} e.g. "girl", {friend},
# {place}, {noun}, {adj}, {a_adj} ("an old"), {verb} {verbs} {verbed} {verbing}.
INTRO_TEMPLATES = [
    "Once upon a time, there was a {kind} named {name}.",
    "There once was a {kind} called {name}.",
    "{name} was a {kind} who lived near the {place}.",
    "One day, a {kind} named {name} went to the {place}.",
    "Once there was a {kind} named {name} who lived in a little home by the {place}.",
    "In a town far away, there lived a {kind} named {name}.",
]
OBJECT_TEMPLATES = [
    "{He} had {a_adj} {noun} that {he} held dear.",
    "One day, {he} found {a_adj} {noun} in the {place}.",
    "At the {place}, {he} saw {a_adj} {noun}.",
    "{His} grandma gave {him} {a_adj} {noun} as a gift.",
    "{He} always kept {a_adj} {noun} next to {his} bed.",
    "On the way to the {place}, {he} came across {a_adj} {noun}.",
    "{name} had a favorite thing in the world: {a_adj} {noun}.",
]
SETTING_SENTENCES = [
    "The sky was blue and the birds were singing.",
    "It was a nice day, and everyone was outside.",
    "The wind blew through the town.",
    "Everyone in the town was out and about that day.",
    "It was the first day of spring.",
]
FRIEND_TEMPLATES = [
    "{name} had a good friend named {friend}.",
    "{friend} came along too.",
    "{His} friend {friend} was there as well.",
]
ACTION_TEMPLATES = [
    "{name} {verbed} with the {noun} all day.",
    "{He} wanted to {verb} with it every day.",
    "Then {he} {verbed} all the way to the {place}.",
    "{name} thought {verbing} was the best thing to do.",
    "Soon {name} and {friend} were {verbing} together.",
    "{He} tried to {verb}, but it was hard at first.",
    "{name} {verbed} again and again until the sun went down.",
    "{name} decided to {verb} in the {place}.",
    "Every morning, {name} {verbed} before breakfast.",
    "{He} had so much fun that {he} {verbed} all afternoon.",
]
AGAIN_TEMPLATES = [  # a second use of the verb, for stories with few features
    "Later, {he} {verbed} once more, just for fun.",
    "The next day, {name} went out {verbing} again.",
    "After that, {name} asked if {he} could {verb} every day.",
]
DIALOGUE_TEMPLATES = [
    '"Look at my {adj} {noun}!" {name} said to {friend}.',
    '"Can I {verb} too?" asked {friend}.',
    '{friend} said, "Wow, that {noun} is so {adj}!"',
    '{name} said, "Let\'s {verb} together!"',
    '"Be nice to the {noun}," said {friend}.',
    '"{name} {verbs} so well!" said {friend}.',
    '"What is that?" asked {friend}. "It is my {noun}," said {name}.',
]
CONFLICT_TEMPLATES = [  # (the conflict, how it resolves when the ending is good)
    ("But there was a problem: {friend} wanted the {noun} too.", "They talked it over and took turns."),
    ("Then a problem came up: the {noun} got stuck high in a tree.",
     "{friend} came with a big stick and got it down."),
    ("{friend} took the {noun}, and the two of them began to fight.",
     "Soon they said sorry and were friends again."),
    ("But there was a big problem: the {noun} fell into the pond.", "{friend} helped {name} get it back."),
    ("{name} and {friend} began to fight about who would go first.", "In the end, they went one by one."),
]
FORESHADOW_TEMPLATES = [
    "{name} did not know that the {noun} would soon be very important.",
    "Little did {he} know, this day would change everything.",
    "There was something odd about the {noun}, but {name} did not know it yet.",
]
TWIST_TEMPLATES = [
    "But then, to {his} surprise, the {noun} began to talk!",
    "Then came a surprise: the {noun} was a gift from {friend} all along.",
    "What a surprise it was when a bunny came out from behind the {noun}!",
    "To everyone's surprise, the {noun} could fly!",
]
HAPPY_ENDINGS = [
    "In the end, {name} was full of joy.",
    "From that day on, {name} and {friend} were best friends.",
    "It was the best day ever for {name}.",
    "That night, {name} went to sleep with a smile on {his} face.",
    "{name} went home feeling good inside.",
]
BAD_ENDINGS = [
    "In the end, the {noun} was gone, and {name} felt very sad.",
    "{name} never saw the {noun} again, and {he} was sad for a long time.",
    "Sadly, the {noun} broke into many pieces, and {name} went home alone.",
    "It was a sad day, and {name} cried and cried.",
]
MORAL_TEMPLATES = [
    "{name} learned that it is good to give to others.",
    "{name} learned an important lesson: always be nice to others.",
    "The lesson was clear: always do what your mom and dad say.",
    "That day, {name} learned that waiting your turn is the best way.",
    "{name} learned that telling the truth is always right.",
]
ALL_DEMO_TEMPLATES = (INTRO_TEMPLATES + OBJECT_TEMPLATES + SETTING_SENTENCES + FRIEND_TEMPLATES
                      + ACTION_TEMPLATES + AGAIN_TEMPLATES + DIALOGUE_TEMPLATES
                      + [s for pair in CONFLICT_TEMPLATES for s in pair]
                      + FORESHADOW_TEMPLATES + TWIST_TEMPLATES + HAPPY_ENDINGS + BAD_ENDINGS + MORAL_TEMPLATES)

_VOWELS = "aeiou"


def _double_final_consonant(verb):
    # one-syllable consonant-vowel-consonant verbs double it: hop -> hopped, but not row/fix/stay
    if len(verb) < 3 or verb[-1] in _VOWELS + "wxy":
        return False
    c1, v, c2 = verb[-3:]
    syllables = len(re.findall(r"[aeiou]+", verb))
    return c1 not in _VOWELS and v in _VOWELS and syllables == 1


def verb_forms(verb):
    """{base, third person -s, past -ed, -ing} by the regular English spelling rules:
    carry carries carried carrying; bake bakes baked baking; hop hops hopped hopping."""
    if re.search(r"(s|x|z|ch|sh)$", verb):
        third = verb + "es"
    elif re.search(r"[^aeiou]y$", verb):
        third = verb[:-1] + "ies"
    else:
        third = verb + "s"
    if verb.endswith("e"):
        past = verb + "d"
    elif re.search(r"[^aeiou]y$", verb):
        past = verb[:-1] + "ied"
    elif _double_final_consonant(verb):
        past = verb + verb[-1] + "ed"
    else:
        past = verb + "ed"
    if verb.endswith(("ee", "oe", "ye")) or not verb.endswith("e"):
        ing = verb + verb[-1] + "ing" if _double_final_consonant(verb) else verb + "ing"
    else:
        ing = verb[:-1] + "ing"
    return {verb, third, past, ing}


def _inflect(verb):
    forms = verb_forms(verb) - {verb}
    third = next(f for f in forms if f.endswith("s"))
    past = next(f for f in forms if f.endswith("ed"))
    ing = next(f for f in forms if f.endswith("ing"))
    return third, past, ing


def _with_article(word):
    # "an" before a vowel sound; "u" spelled with a "you" sound takes "a" (a unicorn, a useful)
    if word.startswith(("uni", "use", "eu")):
        return f"a {word}"
    return f"{'an' if word[0] in _VOWELS else 'a'} {word}"


def _capitalize(sentence):
    return sentence[0].upper() + sentence[1:]


def demo_story(rng, verb, noun, adjective, features):
    """A 3-6 sentence story that uses the three words and shows each feature."""
    name, kind, he = rng.choice(DEMO_HEROES)
    friend = rng.choice(DEMO_FRIENDS)
    third, past, ing = _inflect(verb)
    slots = dict(name=name, kind=kind, friend=friend, place=rng.choice(DEMO_PLACES),
                 he=he, He=he.capitalize(), his="his" if he == "he" else "her",
                 His="His" if he == "he" else "Her", him="him" if he == "he" else "her",
                 noun=noun, adj=adjective, a_adj=_with_article(adjective),
                 verb=verb, verbs=third, verbed=past, verbing=ing)

    def say(template):
        return _capitalize(template.format(**slots))

    opening = [say(rng.choice(INTRO_TEMPLATES)), say(rng.choice(OBJECT_TEMPLATES))]
    middle = [say(rng.choice(ACTION_TEMPLATES))]
    # plain sentences fill the stories with few features, so that all are 40-90 words long
    for extra in rng.sample(["setting", "friend", "again"], max(0, 2 - len(features))):
        if extra == "setting":
            opening.insert(1, rng.choice(SETTING_SENTENCES))
        elif extra == "friend":
            middle.insert(0, say(rng.choice(FRIEND_TEMPLATES)))
        else:
            middle.append(say(rng.choice(AGAIN_TEMPLATES)))
    if "Foreshadowing" in features:
        opening.append(say(rng.choice(FORESHADOW_TEMPLATES)))
    if "Conflict" in features:
        conflict, resolution = rng.choice(CONFLICT_TEMPLATES)
        middle.append(say(conflict))
        if "BadEnding" not in features:
            middle.append(say(resolution))
    if "Dialogue" in features:
        middle.insert(rng.randint(0, len(middle)), say(rng.choice(DIALOGUE_TEMPLATES)))
    if "Twist" in features:
        middle.append(say(rng.choice(TWIST_TEMPLATES)))
    ending = [say(rng.choice(BAD_ENDINGS if "BadEnding" in features else HAPPY_ENDINGS))]
    if "MoralValue" in features:
        ending.append(say(rng.choice(MORAL_TEMPLATES)))
    paragraphs = [" ".join(opening), " ".join(middle), " ".join(ending)]
    summary = f"{name} finds {_with_article(adjective)} {noun} and {third} with it."
    return "\n\n" + "\n\n".join(paragraphs), summary


def demo_record(rng):
    verb, noun, adjective = rng.choice(DEMO_VERBS), rng.choice(DEMO_NOUNS), rng.choice(DEMO_ADJECTIVES)
    # about half the stories have a dialogue; 0-2 features in all
    features = ["Dialogue"] if rng.random() < 0.5 else []
    others = [f for f in GPT_FEATURE_PHRASES if f != "Dialogue"]
    n_others = rng.choice([0, 1] if features else [0, 1, 1, 2])
    features += rng.sample(others, n_others)
    rng.shuffle(features)
    story, summary = demo_story(rng, verb, noun, adjective, features)
    return {"story": story,
            "instruction": {"prompt:": gpt_prompt(verb, noun, adjective, features),
                            "words": [verb, noun, adjective], "features": features},
            "summary": summary, "source": "GPT-4"}


def make_demo(data_dir, num_shards, stories_per_shard, seed):
    out_dir = shards_dir(data_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in tqdm(range(num_shards), desc="make_demo", unit="shard"):
        rng = random.Random(f"tinystories-demo-{seed}-{shard}")  # each shard reproducible on its own
        records = [demo_record(rng) for _ in range(stories_per_shard)]
        path = os.path.join(out_dir, f"data{shard:02d}.json")
        write_json(path, records)
        paths.append(path)
    return paths


if __name__ == "__main__":  # what the demo models know: python demo_corpus.py
    for label, names in [("verbs", DEMO_VERBS), ("nouns", DEMO_NOUNS), ("adjectives", DEMO_ADJECTIVES),
                         ("heroes", [name for name, _, _ in DEMO_HEROES]), ("friends", DEMO_FRIENDS)]:
        print(f"{label} ({len(names)}): {' '.join(names)}\n")
