#!/usr/bin/env python3
"""Generate modfit's synthetic demo data sets (stdlib only, deterministic).

Everything written here comes from the templates and word lists in this file; no existing
data set is used.  Running the script twice with the same seed gives byte-identical files:

    python scripts/make_demo_data.py                      # writes src/modfit/demo_data/
    python scripts/make_demo_data.py --out-dir /tmp/demo  # somewhere else

Files written (see ``src/modfit/demo_data/README.md``):

* ``sentiment_train.csv`` / ``sentiment_test.csv`` / ``sentiment_test.jsonl``  (``text,label``)
* ``topic_train.csv`` / ``topic_test.csv``                                      (``text,label``)
* ``ner_train.conll`` / ``ner_test.conll``                  (``token TAG``, IOB2 over PER/ORG/LOC)
* ``lm_text.txt``                                           (one sentence per line)
* ``README.md``

Train/test generalisation: every word list below may contain the marker ``HELD``; the items
after it are used only when generating the *test* split (the train split never sees them).
Some templates, one whole sentiment domain and some NER templates are test-only as well.

Each output file draws from its own ``random.Random(seed * 100 + k)`` stream (stdlib ``random``,
whose ``choice``/``shuffle``/``random`` sequences are stable across Python versions).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "modfit" / "demo_data"

N_SENTIMENT = (1200, 300)
N_TOPIC = (800, 200)
N_NER = (600, 150)
N_LM = 1000

HELD = "<held-out>"  # items after this marker in a list are test-only


def pool(items: Sequence[str], test: bool) -> list[str]:
    """The usable part of a word list: the train part, or everything for the test split."""
    items = list(items)
    if HELD not in items:
        return items
    i = items.index(HELD)
    return items[:i] + items[i + 1 :] if test else items[:i]


_FORMATTER = string.Formatter()


def render(template: str, resolve: Callable[[str], str], rng: random.Random | None = None) -> str:
    """Fill ``{field}`` slots of ``template``.

    ``{Field}`` (capital first letter) capitalises the value; ``{field2}`` is another value of the
    same kind as ``{field}`` that differs from it; the same name twice gives the same value.
    With ``rng`` the result is finished as a sentence: first letter capitalised, and one time in
    ten a final "!" instead of ".".  Without it, a clause is returned as it is.
    """
    values: dict[str, str] = {}
    parts: list[str] = []
    for literal, field, _spec, _conv in _FORMATTER.parse(template):
        parts.append(literal)
        if field is None:
            continue
        key = field.lower()
        if key not in values:
            base = key.rstrip(string.digits)
            taken = {v for k, v in values.items() if k.rstrip(string.digits) == base}
            value = resolve(base)
            for _ in range(100):
                if value not in taken:
                    break
                value = resolve(base)
            values[key] = value
        value = values[key]
        if field[0].isupper():
            value = value[:1].upper() + value[1:]
        parts.append(value)
    text = " ".join("".join(parts).split())
    text = text.replace(" ,", ",").replace(" .", ".").replace(" ;", ";")
    if rng is None:
        return text
    text = text[:1].upper() + text[1:]
    if text.endswith(".") and rng.random() < 0.1:
        text = text[:-1] + "!"
    return text


# ---------------------------------------------------------------------------------------------
# Sentiment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    verb: str  # past tense, as in "I {verb} the {item} last week"
    items: tuple[str, ...]
    aspects: tuple[str, ...]
    pos_facts: tuple[str, ...]  # lower-case clauses
    neg_facts: tuple[str, ...]
    pos_verdicts: tuple[str, ...]
    neg_verdicts: tuple[str, ...]
    test_only: bool = False


# Word lists and templates are kept compact on purpose.
# fmt: off
DOMAINS: tuple[Domain, ...] = (
    Domain(
        name="gadget",
        verb="bought",
        items=("phone", "laptop", "tablet", "headset", "speaker", "smartwatch", "camera", "monitor",
               "keyboard", "router", HELD, "e-reader", "projector"),
        aspects=("battery", "screen", "sound quality", "build quality", "charger", "camera",
                 "keyboard", "design", "price", HELD, "fan", "software"),
        pos_facts=(
            "the battery easily lasts two full days",
            "the screen is bright and razor sharp",
            "it charges from empty in under an hour",
            "setup took less than five minutes",
            "the sound stays clear even at full volume",
            "it feels sturdy and well made",
            "it survived a fall onto concrete without a scratch",
            "it boots up in a few seconds",
            "the photos come out crisp even at night",
            "it connects instantly every single time",
            HELD,
            "the fan stays whisper quiet under load",
            "it fits neatly in my jacket pocket",
        ),
        neg_facts=(
            "the battery died in less than a day",
            "the screen cracked within a week",
            "it overheats after ten minutes of use",
            "the charger stopped working after a month",
            "the speakers crackle at any volume",
            "it keeps dropping the connection",
            "the buttons feel cheap and loose",
            "it froze three times on the first day",
            "the camera takes blurry photos",
            "it takes forever to turn on",
            HELD,
            "the hinge snapped after two months",
            "the touchscreen ignores half my taps",
        ),
        pos_verdicts=("I would buy it again in a heartbeat", "it is worth every penny",
                      "it is the best purchase I made this year", "I use it every day and love it",
                      HELD, "I have already ordered one for my dad"),
        neg_verdicts=("I am returning it tomorrow", "it was a complete waste of money",
                      "I regret buying it", "I would not buy it again",
                      HELD, "it is going straight back to the store"),
    ),
    Domain(
        name="kitchen",
        verb="bought",
        items=("blender", "coffee maker", "kettle", "air fryer", "juicer", "rice cooker", "stand mixer",
               "slow cooker", HELD, "food processor", "milk frother"),
        aspects=("motor", "lid", "timer", "power cord", "design", "price", "handle", HELD, "display"),
        pos_facts=(
            "it does exactly what it promises",
            "it heats up almost instantly",
            "cleaning it takes less than a minute",
            "it is quiet enough to use early in the morning",
            "the controls are simple and intuitive",
            "it looks great on the counter",
            "it has worked flawlessly every day for a year",
            "it is much faster than my old one",
            HELD,
            "it takes up very little counter space",
            "every part goes straight into the dishwasher",
        ),
        neg_facts=(
            "the lid leaks every time I use it",
            "the motor burned out after two weeks",
            "it is so loud it wakes the whole house",
            "the handle melted slightly on the first use",
            "it takes forever to heat up",
            "the plastic smells awful when it gets hot",
            "the timer stopped working after a few days",
            "it leaves a burnt taste in everything",
            HELD,
            "the glass jug cracked on the third use",
            "food sticks to the basket no matter what",
        ),
        pos_verdicts=("it has made my mornings so much easier", "I use it every single day",
                      "it was worth every penny", HELD, "I bought a second one for my sister"),
        neg_verdicts=("it is going back to the shop", "I regret wasting money on it",
                      "it now lives at the back of a cupboard", HELD, "I have asked for a refund"),
    ),
    Domain(
        name="film",
        verb="watched",
        items=("film", "movie", "thriller", "comedy", "documentary", "sequel", "drama",
               "animated feature", HELD, "musical", "western"),
        aspects=("plot", "acting", "script", "soundtrack", "ending", "pacing", "dialogue",
                 "cinematography", HELD, "visual effects work", "opening scene"),
        pos_facts=(
            "the acting is superb from start to finish",
            "the plot kept me guessing until the very end",
            "the soundtrack gave me chills",
            "every scene looks like a painting",
            "the dialogue is sharp and genuinely funny",
            "the ending had the whole cinema applauding",
            "the lead gives the performance of a lifetime",
            "the two hours flew by",
            HELD,
            "I laughed so hard I nearly cried",
            "the final twist is handled beautifully",
        ),
        neg_facts=(
            "the plot makes no sense at all",
            "the acting is wooden and unconvincing",
            "I nearly fell asleep halfway through",
            "the ending was rushed and confusing",
            "the jokes fall completely flat",
            "it drags on for far too long",
            "the dialogue is clumsy and forced",
            "half the audience walked out before the end",
            HELD,
            "the characters are as flat as cardboard",
            "the twist was obvious from the first scene",
        ),
        pos_verdicts=("I would happily watch it again", "it is the best film I have seen in years",
                      "I have already recommended it to all my friends", HELD,
                      "it deserves every award it gets"),
        neg_verdicts=("I want those two hours of my life back", "it is the worst film I have seen in years",
                      "I would not watch it again even for free", HELD, "I left before the credits"),
    ),
    Domain(
        name="restaurant",
        verb="ate at",
        items=("restaurant", "bistro", "diner", "cafe", "pizzeria", "steakhouse", "noodle bar",
               "seafood place", HELD, "taqueria", "tea room"),
        aspects=("service", "food", "menu", "dessert", "atmosphere", "wine list", "portion size",
                 "price", HELD, "coffee", "seating"),
        pos_facts=(
            "the pasta was cooked to perfection",
            "our waiter was friendly and attentive",
            "the portions are generous and fairly priced",
            "every dish arrived hot and beautifully presented",
            "the desserts are out of this world",
            "the staff made us feel right at home",
            "the bread is baked fresh every morning",
            "we got a table right away even on a Friday night",
            HELD,
            "the soup tasted just like my grandmother's",
            "the chef came out to check on every table",
        ),
        neg_facts=(
            "we waited over an hour for our food",
            "the soup was cold and bland",
            "the waiter was rude and dismissive",
            "the steak was tough and overcooked",
            "the tables were sticky and dirty",
            "the bill was full of charges we never ordered",
            "the fish did not taste fresh",
            "the music was so loud we could not talk",
            HELD,
            "my salad had a hair in it",
            "they forgot half of our order",
        ),
        pos_verdicts=("we will definitely be back", "it is my new favourite place in town",
                      "I would eat there every week if I could", HELD,
                      "we have already booked a table for next month"),
        neg_verdicts=("we will never go back", "we left hungry and annoyed",
                      "I would rather cook at home", HELD, "we ended up getting takeaway on the way home"),
    ),
    Domain(
        name="hotel",
        verb="stayed at",
        items=("hotel", "inn", "resort", "hostel", "guesthouse", "motel", "lodge", "spa hotel", HELD,
               "bed and breakfast", "boutique hotel"),
        aspects=("room", "bed", "breakfast", "location", "staff", "pool", "view", "bathroom", "wifi",
                 HELD, "gym", "lobby"),
        pos_facts=(
            "the room was spotless and spacious",
            "the bed was incredibly comfortable",
            "the staff went out of their way to help us",
            "the breakfast buffet had something for everyone",
            "the view from our balcony was breathtaking",
            "it is a short walk from the old town",
            "check-in took less than two minutes",
            "the pool was clean and never crowded",
            HELD,
            "they upgraded us to a suite for free",
            "the shower had amazing water pressure",
        ),
        neg_facts=(
            "the room smelled of smoke",
            "the sheets had stains on them",
            "the walls were so thin we heard every word next door",
            "the wifi did not work for the entire stay",
            "the air conditioning rattled all night",
            "the receptionist ignored us for twenty minutes",
            "there was mould in the bathroom",
            "the breakfast was stale and overpriced",
            HELD,
            "the lift was broken for three days",
            "our room key stopped working every evening",
        ),
        pos_verdicts=("we would stay there again without hesitation", "it was the highlight of our trip",
                      "I have already booked our next stay", HELD, "it felt like a second home"),
        neg_verdicts=("we checked out a day early", "it ruined our holiday",
                      "I would rather sleep in my car", HELD, "we will be staying elsewhere next time"),
    ),
    Domain(
        name="book",
        verb="read",
        items=("novel", "memoir", "biography", "mystery novel", "short story collection",
               "fantasy novel", "history book", "science fiction novel", HELD, "graphic novel",
               "poetry collection"),
        aspects=("writing", "plot", "main character", "ending", "prose", "pacing", "cover", "first chapter",
                 HELD, "artwork", "dialogue"),
        pos_facts=(
            "I could not put it down",
            "the characters feel like real people",
            "the prose is elegant and precise",
            "every chapter ends on a cliffhanger",
            "the ending moved me to tears",
            "it taught me something new on every page",
            "I finished it in a single weekend",
            "the world building is rich and original",
            HELD,
            "I have already reread my favourite chapters",
            "the author brings the old city vividly to life",
        ),
        neg_facts=(
            "I gave up after fifty pages",
            "the characters are flat and forgettable",
            "the writing is clumsy and repetitive",
            "the plot goes nowhere",
            "the ending felt lazy and unearned",
            "the middle chapters are a slog",
            "it is full of typos",
            "the story is a copy of a dozen better ones",
            HELD,
            "the author keeps repeating the same point",
            "the big reveal made no sense",
        ),
        pos_verdicts=("it is the best book I have read this year", "I have bought copies for all my friends",
                      "I cannot wait for the next one", HELD, "it has earned a permanent place on my shelf"),
        neg_verdicts=("it is going straight to the charity shop", "I wish I had never started it",
                      "I will not read anything else by this author", HELD,
                      "I only finished it out of spite"),
    ),
    Domain(
        name="app",
        verb="tried",
        items=("app", "game", "website", "music app", "budgeting app", "fitness app", "photo editor",
               "language app", HELD, "podcast app", "map app"),
        aspects=("interface", "loading time", "notification system", "subscription price", "customer support",
                 "design", "sync", "search", HELD, "dark mode", "offline mode"),
        pos_facts=(
            "the interface is clean and easy to use",
            "it loads instantly even on my old phone",
            "syncing between devices just works",
            "support answered my question within an hour",
            "it has helped me save money every month",
            "the free version is surprisingly generous",
            "updates arrive regularly and fix real problems",
            "it has never crashed once",
            HELD,
            "the search finds exactly what I need",
            "the tutorials are short and helpful",
        ),
        neg_facts=(
            "it crashes every time I open it",
            "it drains my battery in a few hours",
            "the ads pop up every thirty seconds",
            "it deleted all my saved data",
            "the subscription renewed without asking me",
            "support never replied to my emails",
            "the latest update broke everything",
            "it takes ages to load a single page",
            HELD,
            "it logs me out every single day",
            "the buttons are too small to tap",
        ),
        pos_verdicts=("it is now on my home screen for good", "I happily pay for the premium version",
                      "I cannot imagine going back", HELD, "I have told everyone at work about it"),
        neg_verdicts=("I uninstalled it after a day", "I cancelled my subscription immediately",
                      "I have gone back to the old one", HELD, "I deleted my account the same evening"),
    ),
    Domain(
        name="clothing",
        verb="bought",
        items=("jacket", "coat", "sweater", "dress", "backpack", "raincoat", "pair of jeans",
               "pair of running shoes", HELD, "scarf", "suitcase"),
        aspects=("fabric", "fit", "stitching", "zipper", "colour", "sizing", "lining", HELD, "inner pocket",
                 "shoulder strap"),
        pos_facts=(
            "it fits perfectly right out of the box",
            "the fabric is soft and breathable",
            "it kept me dry in a heavy storm",
            "the stitching is neat and strong",
            "it still looks new after a dozen washes",
            "the colour is exactly as pictured",
            "it is warm without being bulky",
            "the zipper runs smoothly every time",
            HELD,
            "I get compliments every time I wear it",
            "the pockets are deep enough for my phone",
        ),
        neg_facts=(
            "it fell apart after two washes",
            "the zipper broke on the first day",
            "the sizing is way off",
            "the fabric is scratchy and thin",
            "the colour faded after one wash",
            "the seams came apart within a week",
            "it let the rain straight through",
            "it shrank two sizes in the wash",
            HELD,
            "the strap snapped on my first trip",
            "the dye stained my other clothes",
        ),
        pos_verdicts=("I have already ordered a second one", "it is the best thing in my wardrobe",
                      "I wear it almost every day", HELD, "I will buy every colour they make"),
        neg_verdicts=("it went straight back in the box", "I would not buy from this brand again",
                      "it is not worth half the price", HELD, "it is already in the donation bag"),
    ),
    Domain(
        name="service",
        verb="used",
        items=("delivery service", "courier", "repair shop", "internet provider", "cleaning company",
               "bank", "phone company", "car rental company", HELD, "moving company", "car wash"),
        aspects=("staff", "pricing", "booking system", "customer service", "punctuality",
                 "communication", "website", "phone line", HELD, "waiting room", "loyalty scheme"),
        pos_facts=(
            "the staff were friendly and professional",
            "everything arrived on time and in perfect condition",
            "they fixed the problem on the first visit",
            "booking took only a couple of clicks",
            "they kept me updated at every step",
            "the prices were lower than anywhere else",
            "they answered the phone on the first ring",
            "the whole process was quick and painless",
            HELD,
            "they stayed late to finish the job",
            "they refunded me without any fuss",
        ),
        neg_facts=(
            "they lost my package twice",
            "nobody answered the phone for days",
            "they charged me twice for the same thing",
            "the staff were rude and unhelpful",
            "the connection drops every evening",
            "they cancelled my appointment at the last minute",
            "the repair broke again within a week",
            "I spent three hours on hold",
            HELD,
            "they left a mess everywhere",
            "the hidden fees doubled the price",
        ),
        pos_verdicts=("I will use them for everything from now on",
                      "I have recommended them to my neighbours", "they have earned a loyal customer", HELD,
                      "I would hire them again tomorrow"),
        neg_verdicts=("I have switched to a competitor", "I am filing a complaint",
                      "I would not trust them with anything", HELD, "I am still waiting for a refund"),
    ),
    # A whole domain that only the test split uses.
    Domain(
        name="event",
        verb="went to",
        items=("concert", "play", "comedy show", "opera", "festival", "exhibition", "ballet"),
        aspects=("sound", "seating", "main act", "lighting", "venue", "ticket price", "programme"),
        pos_facts=(
            "the band played for almost three hours",
            "the cast received a standing ovation",
            "the sound was crystal clear from every seat",
            "the lighting design took my breath away",
            "the singers were in perfect form",
            "the crowd was friendly and relaxed",
            "every act was better than the last",
        ),
        neg_facts=(
            "the sound was muddy and far too loud",
            "the main act cancelled an hour before the start",
            "we could barely see the stage",
            "the queue for drinks took forty minutes",
            "the performers seemed bored",
            "the venue was overcrowded and hot",
            "it started two hours late",
        ),
        pos_verdicts=("I would go again tomorrow", "it was the best night out in ages",
                      "I have already bought tickets for next year"),
        neg_verdicts=("we left at the interval", "it was a waste of an evening",
                      "I will not be buying tickets again"),
        test_only=True,
    ),
)

POS_ADJ = ("great", "excellent", "fantastic", "wonderful", "superb", "outstanding", "impressive",
           "brilliant", "terrific", "first-rate", "top-notch", "lovely", "marvellous", "exceptional",
           "fabulous", "amazing", HELD, "splendid", "stellar", "phenomenal", "magnificent")
NEG_ADJ = ("terrible", "awful", "horrible", "disappointing", "dreadful", "poor", "mediocre", "lousy",
           "abysmal", "subpar", "atrocious", "shoddy", "pathetic", "miserable", "appalling", "woeful",
           HELD, "dismal", "lamentable", "abominable", "wretched")
INTENSIFIERS = ("really", "truly", "incredibly", "absolutely", "extremely", "genuinely", "remarkably",
                "very", "so", "exceptionally", "unbelievably", "thoroughly", "", "", "", HELD,
                "utterly", "seriously")
MILD_POS = ("decent", "pretty good", "perfectly fine", "solid", "nice enough", "better than I expected",
            "quite good", "reasonably good", "good value", "pleasant enough", HELD, "fairly pleasant",
            "not half bad")
MILD_NEG = ("a bit disappointing", "underwhelming", "rather forgettable", "somewhat lacking",
            "not quite worth it", "a little overpriced", "just okay at best", "a bit of a letdown",
            "weaker than I hoped", "rather bland", HELD, "slightly below par", "rather uninspiring")
# Negative words that read as praise when negated ("not bad at all").
NEGATABLE_NEG = ("bad", "disappointing", "a letdown", "overrated", "a waste of money", "terrible",
                 "boring", HELD, "dull", "a rip-off")
# Positive words that read as criticism when negated ("not worth the money").
NEGATABLE_POS = ("good", "great", "worth the money", "enjoyable", "impressive", "as advertised",
                 "worth the price", "worth the hype", HELD, "pleasant", "any fun")
WHEN = ("last week", "yesterday", "over the weekend", "last month", "on Friday", "a few days ago",
        "on my birthday", "during the holidays", "last summer", HELD, "this morning", "two weeks ago")
WHO = ("sister", "brother", "friend", "colleague", "neighbour", "cousin", "mum", "dad", "partner",
       "flatmate", HELD, "boss", "uncle")
RATING_POS = ("Five stars", "Ten out of ten", "Full marks", "Nine out of ten", "Five out of five", HELD,
              "A perfect score")
RATING_NEG = ("One star", "Two out of ten", "Zero stars if I could", "One out of five", "Half a star",
              HELD, "A generous one star")
GENERIC_POS_VERDICTS = ("I would recommend it to anyone", "it exceeded all my expectations",
                        "I am thoroughly impressed", "it was money well spent", "I have no regrets at all",
                        "it deserves all the praise it gets", HELD, "it made my whole week")
GENERIC_NEG_VERDICTS = ("I would not recommend it to anyone", "it was a total letdown",
                        "I am thoroughly disappointed", "it was money down the drain", "I want my money back",
                        "it did not live up to the hype", HELD, "it made my whole week worse")
MINOR_POS = ("the packaging looked nice", "it arrived on time", "the price seemed fair",
             "the photos online looked promising", "the first impression was good", HELD,
             "the advert was clever")
MINOR_NEG = ("it is a bit pricey", "the packaging was a mess", "it took a while to arrive",
             "the instructions were confusing", "the first impression was not great", HELD,
             "the advert oversells it")

# Templates per label.  Comments name the kind of case; "hard" ones need word order or negation.
# Lists continue after HELD with test-only templates.
POSITIVE_TEMPLATES = (
    "The {item} is {intens} {pos_adj}.",
    "What {a_pos_adj} {item}, {pos_verdict}.",
    "{Pos_fact}.",
    "{Pos_fact} and {pos_fact2}.",
    "{Pos_fact}. {Pos_verdict}.",
    "I {verb} the {item} {when} and {pos_verdict}.",
    "Honestly, {pos_fact}. {Pos_verdict}.",
    "My {who} recommended the {item} and {pos_fact}.",
    "{Rating_pos}. {Pos_fact}.",
    "The {aspect} is {pos_adj}, and the {aspect2} is {intens} {pos_adj2}.",
    "{Pos_fact}, which made the whole thing {intens} {pos_adj}.",
    # mild wording
    "The {item} is {mild_pos}, and {pos_fact}.",
    "It's {mild_pos}. Nothing spectacular, but {pos_fact}.",
    # negation that ends up positive
    "Not {negatable_neg} at all. {Pos_fact}.",
    "The {item} was not {negatable_neg} at all; in fact {pos_fact}.",
    "I was worried the {item} would be {negatable_neg}, but it wasn't.",
    "I can't recommend this {item} enough.",
    "I have no complaints about the {item}; {pos_fact}.",
    "Never had a single problem with the {item}, {pos_verdict}.",
    "There is nothing I dislike about this {item}.",
    # contrast: the main clause after "but"/"although" decides
    "{Neg_fact}, but {pos_fact}.",
    "{Neg_fact}, but {pos_verdict}.",
    "Although {minor_neg}, {pos_fact}.",
    "I didn't expect much from this {item}, but {pos_fact}.",
    "The {aspect} is {neg_adj}, but the {aspect2} is {intens} {pos_adj} and that is what matters.",
    "I was ready to complain because {minor_neg}, but {pos_verdict}.",
    HELD,
    "It took me a while to warm up to the {item}, but now {pos_verdict}.",
    "Far from {negatable_neg}: {pos_fact}.",
    "If you are on the fence, go for it; {pos_fact}.",
    "{Pos_fact}. I'm glad I ignored the bad reviews.",
    "Could not be happier with the {item}.",
    "Despite my doubts, {pos_fact} and {pos_verdict}.",
    "Sure, {minor_neg}, yet {pos_fact}.",
)
NEGATIVE_TEMPLATES = (
    "The {item} is {intens} {neg_adj}.",
    "What {a_neg_adj} {item}, {neg_verdict}.",
    "{Neg_fact}.",
    "{Neg_fact} and {neg_fact2}.",
    "{Neg_fact}. {Neg_verdict}.",
    "I {verb} the {item} {when} and {neg_verdict}.",
    "Honestly, {neg_fact}. {Neg_verdict}.",
    "My {who} warned me about the {item} and {neg_fact}.",
    "{Rating_neg}. {Neg_fact}.",
    "The {aspect} is {neg_adj}, and the {aspect2} is {intens} {neg_adj2}.",
    "{Neg_fact}, which made the whole thing {intens} {neg_adj}.",
    # mild wording
    "The {item} is {mild_neg}; {neg_fact}.",
    "It's {mild_neg}. Not a disaster, but {neg_fact}.",
    # negation that ends up negative
    "The {item} was not {negatable_pos} at all.",
    "I didn't enjoy the {item} at all; {neg_fact}.",
    "It's not terrible, but {neg_fact} and {neg_verdict}.",
    "I can't recommend this {item}; {neg_fact}.",
    "Nothing about the {item} worked as promised.",
    "I never want to see this {item} again.",
    "Not {negatable_pos}, I'm afraid. {Neg_fact}.",
    # contrast: the main clause after "but"/"although" decides
    "{Pos_fact}, but {neg_fact}.",
    "{Pos_fact}, but {neg_verdict}.",
    "Although {minor_pos}, {neg_fact}.",
    "Everyone said it was {pos_adj}, but {neg_fact}.",
    "The {aspect} is {pos_adj}, but the {aspect2} is {intens} {neg_adj} and that ruins it.",
    "I wanted to love this {item}, but {neg_verdict}.",
    HELD,
    "On paper the {item} looked {pos_adj}; in reality {neg_fact}.",
    "Save your money: {neg_fact}.",
    "I don't understand the good reviews; {neg_fact}.",
    "{Neg_fact}. Never again.",
    "The only {pos_adj} thing about this {item} was the advertising.",
    "It started well, but {neg_fact} and it went downhill from there.",
    "Sure, {minor_pos}, yet {neg_fact}.",
)
# fmt: on


def _article(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def sentiment_sentence(rng: random.Random, label: str, test: bool) -> str:
    domains = [d for d in DOMAINS if test or not d.test_only]
    d = rng.choice(domains)
    templates = pool(POSITIVE_TEMPLATES if label == "positive" else NEGATIVE_TEMPLATES, test)
    template = rng.choice(templates)

    def pick(items: Sequence[str], more: Sequence[str] = ()) -> str:
        return rng.choice(pool(items, test) + pool(more, test))

    def resolve(name: str) -> str:
        table: dict[str, Callable[[], str]] = {
            "item": lambda: pick(d.items),
            "aspect": lambda: pick(d.aspects),
            "verb": lambda: d.verb,
            "pos_fact": lambda: pick(d.pos_facts),
            "neg_fact": lambda: pick(d.neg_facts),
            "pos_verdict": lambda: pick(d.pos_verdicts, GENERIC_POS_VERDICTS),
            "neg_verdict": lambda: pick(d.neg_verdicts, GENERIC_NEG_VERDICTS),
            "pos_adj": lambda: pick(POS_ADJ),
            "neg_adj": lambda: pick(NEG_ADJ),
            "a_pos_adj": lambda: _article(pick(POS_ADJ)),
            "a_neg_adj": lambda: _article(pick(NEG_ADJ)),
            "intens": lambda: pick(INTENSIFIERS),
            "mild_pos": lambda: pick(MILD_POS),
            "mild_neg": lambda: pick(MILD_NEG),
            "negatable_neg": lambda: pick(NEGATABLE_NEG),
            "negatable_pos": lambda: pick(NEGATABLE_POS),
            "when": lambda: pick(WHEN),
            "who": lambda: pick(WHO),
            "rating_pos": lambda: pick(RATING_POS),
            "rating_neg": lambda: pick(RATING_NEG),
            "minor_pos": lambda: pick(MINOR_POS),
            "minor_neg": lambda: pick(MINOR_NEG),
        }
        return table[name]()

    return render(template, resolve, rng)


# ---------------------------------------------------------------------------------------------
# Topic classification
# ---------------------------------------------------------------------------------------------

TOPICS = ("sports", "technology", "food", "travel")

# fmt: off
TOPIC_FACTS: dict[str, tuple[str, ...]] = {
    "sports": (
        "the {team} beat the {team2} {score}",
        "the {team} sacked their coach after five straight defeats",
        "the striker scored twice in the second half",
        "the marathon was postponed because of the heat",
        "the tennis champion retired at thirty-one",
        "the cycling race finished with a sprint to the line",
        "a teenager broke the national record in the hundred metres",
        "the league will add two new teams next season",
        "the goalkeeper saved a penalty in the final minute",
        "the swimmer won three gold medals in one evening",
        "the boxing match ended in the first round",
        "tickets for the derby sold out in minutes",
        "the rugby captain hurt his shoulder in training",
        "the basketball team signed a new point guard",
        "the golf tournament went to a play-off",
        HELD,
        "the cricket match was abandoned because of rain",
        "the skier crashed at the last gate",
    ),
    "technology": (
        "{company} released a {device} with {feature}",
        "{company} is recalling its {device} over a software fault",
        "the new phone chip is twice as fast as last year's",
        "a startup released an open-source database",
        "the messaging update adds end-to-end encryption",
        "researchers built a battery that charges in five minutes",
        "a software bug exposed thousands of passwords",
        "the robot vacuum can now map the whole house",
        "the cloud service went down for six hours",
        "the new programming language compiles to tiny binaries",
        "engineers tested a faster wireless standard",
        "the chipmaker opened a new factory",
        "the operating system update fixes a serious security hole",
        "the company trained a speech recognition model on its own servers",
        "the browser now blocks tracking cookies by default",
        HELD,
        "the search engine can now summarise web pages",
        "the satellite internet service doubled its speed",
    ),
    "food": (
        "{eatery} now serves {dish}",
        "{eatery} is famous for its {dish}",
        "the bakery's sourdough sells out by nine every morning",
        "slow-roasting tomatoes brings out their sweetness",
        "the night market has over fifty street food stalls",
        "the recipe calls for fresh basil and a pinch of salt",
        "the new ramen shop makes its noodles by hand",
        "the cheese is aged in caves for two years",
        "the cookbook focuses on quick vegetarian dinners",
        "a little lemon zest lifts the flavour of the cake",
        "the coffee roaster buys beans from small farms",
        "the village holds a chocolate festival every spring",
        "the dumplings are steamed in bamboo baskets",
        "the chef swears by cooking rice with a bay leaf",
        "the soup is thickened with roasted potatoes",
        HELD,
        "the curry is simmered for six hours",
        "the orchard presses fresh cider every autumn",
    ),
    "travel": (
        "{destination} is {travel_claim}",
        "we spent a week in {destination} and {travel_detail}",
        "the airline added direct flights to the coast",
        "the old town is best explored on foot",
        "the night train crosses the mountains in twelve hours",
        "the island ferry runs twice a day in summer",
        "the hostel is a short walk from the main square",
        "visa rules for the region changed this year",
        "the hiking trail passes three glacier lakes",
        "the museum pass covers entry to twenty sites",
        "backpackers crowd the beaches every August",
        "the cruise ship docked in the harbour at dawn",
        "the mountain village has only one road in and out",
        "the guidebook recommends visiting in early spring",
        "our flight was rerouted through a tiny island airport",
        HELD,
        "the airport opened a new terminal for budget flights",
        "the canal tour leaves every half hour",
    ),
}
TOPIC_INTERESTS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "tennis", "basketball", "the cycling season", "marathon training",
               "the league table", "the upcoming derby", "the transfer window", "the Olympic trials",
               "golf", "rowing", HELD, "ice hockey", "the title fight"),
    "technology": ("programming", "artificial intelligence", "the latest smartphones", "home automation",
                   "cybersecurity", "building computers", "open-source software", "chip design",
                   "data storage", "robotics", "cloud computing", HELD, "quantum computing",
                   "virtual reality headsets"),
    "food": ("baking bread", "Italian cooking", "fermenting vegetables", "street food", "spicy noodles",
             "home-made pasta", "vegan desserts", "barbecue", "coffee tasting", "cheese making",
             "regional curries", HELD, "pickling", "chocolate making"),
    "travel": ("backpacking", "road trips", "cheap flights", "island hopping", "travel photography",
               "hiking abroad", "long train journeys", "camping holidays", "visiting old castles",
               "learning phrases before a trip", "city breaks", HELD, "river cruises", "desert safaris"),
}
# Where/when someone read or heard the news; drawn from a *different* topic as a distractor.
TOPIC_CONTEXTS: dict[str, tuple[str, ...]] = {
    "sports": ("after the match", "during half-time", "on the way back from the gym",
               "while warming up for my run", HELD, "in the stadium car park"),
    "technology": ("while my laptop was updating", "on my new phone", "during a software meeting",
                   "while my tablet was charging", HELD, "between two video calls"),
    "food": ("over lunch", "while waiting for my pizza", "at the bakery this morning",
             "over a bowl of noodles", HELD, "while the bread was rising"),
    "travel": ("on the train home", "while waiting at the airport", "in a hostel lobby",
               "on the ferry this morning", HELD, "at the border crossing"),
}
TOPIC_SLOTS: dict[str, tuple[str, ...]] = {
    "team": ("Riverton Rovers", "Northgate Falcons", "Eastbrook Wolves", "Harbour City Hawks",
             "Millford Comets", "Stonebridge Rangers", "Westfield Bears", "Ashdown Athletic", HELD,
             "Lakeside Lions", "Crestmoor Town"),
    "score": ("by two goals", "three to one", "in a penalty shootout", "after extra time",
              "by a single point", "for the first time in a decade", HELD, "in the last second"),
    "company": ("Nexora", "Brightbyte", "Qubitron", "Solvane", "Tekkado", "Pixelforge", "Datavine",
                "Corelink", HELD, "Voltrane", "Synthera"),
    "device": ("new laptop", "budget phone", "smart speaker", "graphics card", "wireless router",
               "fitness tracker", "tablet", "home server", HELD, "drone", "VR headset"),
    "feature": ("a faster processor", "twice the memory", "a longer-lasting battery", "a brighter display",
                "a built-in voice assistant", "better encryption", "faster charging", HELD,
                "an AI photo editor", "satellite messaging"),
    "eatery": ("the corner cafe", "the new bistro downtown", "the family bakery",
               "the noodle bar on Main Street", "the food truck by the park", "the seaside grill",
               "the school canteen", "the farmers market stall", HELD, "the vegan deli", "the night market"),
    "dish": ("spicy pumpkin soup", "hand-pulled noodles", "wood-fired pizza", "lemon and ginger cake",
             "slow-cooked beef stew", "fresh mango smoothies", "grilled halloumi wraps", "crispy fried tofu",
             "blueberry pancakes", HELD, "saffron rice pudding", "smoked trout salad"),
    "destination": ("Velmora", "Dunhallow", "Port Caridan", "the Tessen valley", "Lake Orvin",
                    "the old city of Sarvel", "the Brenmoor highlands", "the island of Kessara", HELD,
                    "the Amberlee coast", "the village of Rhosmel"),
    "travel_claim": ("a popular stop for backpackers", "easy to reach by overnight train",
                     "best visited in early autumn", "known for its cheap hostels",
                     "getting a new international airport", "full of tourists every August",
                     "a great base for hiking trips", "linked to the mainland by a daily ferry", HELD,
                     "famous for its canal boat tours", "reachable only by a mountain road"),
    "travel_detail": ("never once needed a taxi", "explored every beach on the island",
                      "took the cable car to the summit", "missed our connecting train twice",
                      "stayed in a different guesthouse every night", HELD,
                      "rented bicycles to see the coast"),
}
TOPIC_TEMPLATES = (
    "{Fact}.",
    "I read this morning that {fact}.",
    "According to the local paper, {fact}.",
    "My {who} told me that {fact}.",
    "Did you hear that {fact}?",
    "{Fact}, which surprised a lot of people.",
    "Everyone at work is talking about how {fact}.",
    "My {who} is really into {interest} these days.",
    "I spent the whole weekend reading about {interest}.",
    "The podcast this week was all about {interest}.",
    "{Fact}. Also, {fact2}.",
    "If you are interested in {interest}, you should know that {fact}.",
    "{Context}, I read that {fact}.",
    "{Context}, my {who} and I argued about {interest}.",
    "The new blog about {interest} has become very popular.",
    # the label follows the news, not the distracting interest of another topic
    "My {who}, who is obsessed with {other_interest}, told me that {fact}.",
    "I meant to read up on {other_interest}, but instead I learned that {fact}.",
    "Forget {other_interest} for a moment: {fact}.",
    HELD,
    "Breaking news: {fact}.",
    "Even my {who}, who only talks about {other_interest}, noticed that {fact}.",
    "It turns out that {fact}.",
    "I have recently started getting into {interest}.",
    "Nobody expected that {fact}.",
)
# fmt: on


def topic_sentence(rng: random.Random, label: str, test: bool) -> str:
    template = rng.choice(pool(TOPIC_TEMPLATES, test))
    others = [t for t in TOPICS if t != label]

    def pick(items: Sequence[str]) -> str:
        return rng.choice(pool(items, test))

    def resolve(name: str) -> str:
        if name == "fact":
            return render(pick(TOPIC_FACTS[label]), lambda slot: pick(TOPIC_SLOTS[slot]))
        if name == "interest":
            return pick(TOPIC_INTERESTS[label])
        if name == "context":
            return pick(TOPIC_CONTEXTS[rng.choice(others)])
        if name == "other_interest":
            return pick(TOPIC_INTERESTS[rng.choice(others)])
        if name == "who":
            return pick(WHO)
        raise KeyError(name)

    return render(template, resolve, rng)


# ---------------------------------------------------------------------------------------------
# Named entities
# ---------------------------------------------------------------------------------------------

# fmt: off
FIRST_HEADS = ("Ka", "Mar", "Lo", "Be", "Da", "Ri", "Te", "So", "Ja", "Ne", "Vi", "Ar", "El", "Ha", "Mi",
               "Or", "Pe", "Sa", "Tu", "Ze", HELD, "Quo", "Yse")
FIRST_TAILS = ("ren", "lia", "ro", "na", "vin", "set", "mon", "dra", "lo", "bel", "rik", "sha", "tan",
               "vo", HELD, "dith", "wen")
SUR_HEADS = ("Bal", "Cor", "Dun", "Fen", "Gar", "Hol", "Kes", "Lind", "Mor", "Nor", "Pell", "Quin", "Rav",
             "Stan", "Thor", "Vel", "Wick", "Yar", HELD, "Brix", "Oak")
SUR_TAILS = ("ford", "sen", "ley", "ton", "ova", "ari", "berg", "ridge", "mont", "ez", "by", "ham",
             "stead", "ski", HELD, "vane", "holm")
PLACE_HEADS = ("Bel", "Cal", "Dor", "Esk", "Fal", "Glen", "Hav", "Ister", "Kor", "Lun", "Mar", "Nor",
               "Ost", "Pra", "Ruv", "Sel", "Tam", "Val", "Wes", "Zan", HELD, "Quel", "Ymb")
PLACE_FORMS = ("{h}ville", "{h}ton", "{h}burg", "{h}ia", "{h}mouth", "Port {H}", "New {H}", "Lake {H}",
               "{H} Valley", "Mount {H}", "{H}ford", "North {H}", "{H} Bay", HELD, "{H} Springs",
               "Upper {H}")
ORG_FORMS = ("{S} Industries", "{S} Systems", "{S} Foods", "{S} Bank", "Bank of {L}", "{L} United",
             "{S}tek", "{S}corp", "{S} Group", "University of {L}", "{L} Times", "{S} Labs",
             "{S} and {S2}", "{L} City Council", "{S} Logistics", HELD, "{S} Pharma", "{L} Rail")
NER_TEMPLATES = (
    "{PER} works for {ORG} in {LOC} .",
    "{PER} was born in {LOC} .",
    "{ORG} opened a new office in {LOC} last year .",
    "{PER} and {PER2} met at a conference in {LOC} .",
    "The mayor of {LOC} , {PER} , visited {ORG} on Monday .",
    "{ORG} hired {PER} as its new chief executive .",
    "According to {ORG} , prices in {LOC} rose by four percent .",
    "{PER} moved from {LOC} to {LOC2} in 2019 .",
    "Shares of {ORG} fell sharply after {PER} resigned .",
    "{PER} said the project would create jobs in {LOC} .",
    "{ORG} and {ORG2} announced a merger on Tuesday .",
    "Yesterday , {PER} flew to {LOC} to meet {PER2} .",
    "{LOC} is famous for its old harbour .",
    "{PER} studied at {ORG} before returning to {LOC} .",
    "The festival in {LOC} was organised by {ORG} .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "Heavy rain caused flooding in {LOC} and {LOC2} .",
    "{PER} won the race in {LOC} for the third time .",
    "{ORG} will build a factory near {LOC} .",
    "Nobody at {ORG} expected {PER} to leave .",
    "Mr. {SUR} told reporters in {LOC} that talks with {ORG} had failed .",
    "Dr. {SUR} leads the research team at {ORG} .",
    "In {LOC} , {PER} opened a small bakery with {PER2} .",
    "{PER} thanked the fans after the match in {LOC} .",
    "The report by {ORG} praised schools in {LOC} .",
    "{PER} joined {ORG} after ten years at {ORG2} .",
    "The road between {LOC} and {LOC2} will close for repairs .",
    "The meeting was postponed until next week .",
    "Prices rose again this month , the report said .",
    HELD,
    "Last spring , {PER} sold her shares in {ORG} .",
    "Tourists in {LOC} can now rent bikes from {ORG} .",
    "{ORG} confirmed that {PER} will speak in {LOC} next month .",
    "Ms. {SUR} grew up near {LOC} .",
    "Officials in {LOC} met {PER} to discuss the new bridge .",
)
# fmt: on


def _name(rng: random.Random, heads: Sequence[str], tails: Sequence[str], test: bool) -> str:
    return rng.choice(pool(heads, test)) + rng.choice(pool(tails, test))


def _place(rng: random.Random, test: bool) -> list[str]:
    h = rng.choice(pool(PLACE_HEADS, test))
    form = rng.choice(pool(PLACE_FORMS, test))
    return form.replace("{h}", h).replace("{H}", h).split()


def _person(rng: random.Random, test: bool) -> list[str]:
    first = _name(rng, FIRST_HEADS, FIRST_TAILS, test)
    sur = _name(rng, SUR_HEADS, SUR_TAILS, test)
    r = rng.random()
    if r < 0.25:
        return [first]
    if r < 0.9:
        return [first, sur]
    return [first, _name(rng, FIRST_HEADS, FIRST_TAILS, test), sur]


def _org(rng: random.Random, test: bool) -> list[str]:
    form = rng.choice(pool(ORG_FORMS, test))
    sur = _name(rng, SUR_HEADS, SUR_TAILS, test)
    sur2 = _name(rng, SUR_HEADS, SUR_TAILS, test)
    loc = " ".join(_place(rng, test))
    return form.replace("{S2}", sur2).replace("{S}", sur).replace("{L}", loc).split()


def ner_sentence(rng: random.Random, test: bool) -> list[tuple[str, str]]:
    template = rng.choice(pool(NER_TEMPLATES, test))
    tagged: list[tuple[str, str]] = []
    seen: dict[str, list[str]] = {}
    for literal, field, _spec, _conv in _FORMATTER.parse(template):
        tagged.extend((tok, "O") for tok in literal.split())
        if field is None:
            continue
        kind = field.rstrip(string.digits)
        if kind == "SUR":
            tokens, tag = [_name(rng, SUR_HEADS, SUR_TAILS, test)], "PER"
        else:
            make = {"PER": _person, "ORG": _org, "LOC": _place}[kind]
            tokens = make(rng, test)
            while any(tokens == v for v in seen.values()):
                tokens = make(rng, test)
            tag = kind
        seen[field] = tokens
        tagged.extend((tok, ("B-" if i == 0 else "I-") + tag) for i, tok in enumerate(tokens))
    return tagged


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _unique(make: Callable[[], str], n: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n:
            raise RuntimeError("generator ran out of distinct sentences")
        text = make()
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def make_labelled(
    sentence: Callable[[random.Random, str, bool], str],
    labels: Sequence[str],
    n: int,
    test: bool,
    seed: int,
    exclude: set[str],
) -> list[tuple[str, str]]:
    """``n`` distinct (text, label) rows, ``n / len(labels)`` per label, in shuffled order."""
    rng = random.Random(seed)
    per_label = n // len(labels)
    assert per_label * len(labels) == n
    rows: list[tuple[str, str]] = []
    taken = set(exclude)
    for label in labels:
        texts = _unique(lambda label=label: sentence(rng, label, test), per_label, taken)
        taken.update(texts)
        rows.extend((t, label) for t in texts)
    rng.shuffle(rows)
    return rows


def write_csv(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def write_jsonl(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def write_conll(path: Path, sentences: Sequence[list[tuple[str, str]]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("\n\n".join("\n".join(f"{tok} {tag}" for tok, tag in s) for s in sentences) + "\n")


README = """\
# modfit demo data

Small **synthetic** data sets for modfit's demos, examples and tests. Every sentence was
generated by `scripts/make_demo_data.py` from templates and word lists written for modfit
(invented names, places and organisations included); nothing is copied from an existing data
set. License: Apache-2.0, the same as the project.

Regenerate (byte-identical output; seed {seed}):

    python scripts/make_demo_data.py            # optional: --out-dir DIR --seed N

Files (plain ASCII text, `\\n` line endings):

- `sentiment_train.csv` ({n_sent_train} rows) and `sentiment_test.csv` ({n_sent_test} rows): short
  reviews of gadgets, kitchen appliances, films, restaurants, hotels, books, apps, clothes and
  services. Columns `text,label`; label `positive` or `negative`; balanced.
- `sentiment_test.jsonl`: the same {n_sent_test} test rows as JSON lines,
  `{{"text": ..., "label": ...}}`, to exercise the JSONL loader.
- `topic_train.csv` ({n_topic_train} rows) and `topic_test.csv` ({n_topic_test} rows): short news-like
  sentences. Columns `text,label`; label one of `sports`, `technology`, `food`, `travel`; balanced.
- `ner_train.conll` ({n_ner_train} sentences) and `ner_test.conll` ({n_ner_test} sentences): named
  entities in CoNLL style, one `token TAG` per line (a single space between), a blank line between
  sentences, IOB2 tags over `PER`, `ORG` and `LOC` (single- and multi-token entities).
- `lm_text.txt` ({n_lm} lines): plain English sentences, one per line, for masked or causal LM
  training. No sentence of a test split appears in it.

Sentiment reviews mix easy cases with harder ones: negation ("not bad at all", "I didn't enjoy
the film"), contrast where the main clause decides the label (the one after *but*, not the
*although* clause: "the screen is bright and razor sharp, but the battery died in less than a
day" is negative), intensifiers,
mild wording and two-sentence reviews. Labels follow the templates that produced each sentence.

The test splits are not a random slice of the train distribution: some templates, some words
and names, and (for sentiment) one whole review domain, live events, appear only in the test
splits, so test accuracy measures some generalisation. No text appears twice within a file or
in both a train and a test file.
"""


def generate(out_dir: Path, seed: int = SEED) -> list[Path]:
    """Write every demo data file into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = ("positive", "negative")
    sent_train = make_labelled(sentiment_sentence, labels, N_SENTIMENT[0], False, seed * 100 + 1, set())
    sent_test = make_labelled(
        sentiment_sentence, labels, N_SENTIMENT[1], True, seed * 100 + 2, {t for t, _ in sent_train}
    )
    topic_train = make_labelled(topic_sentence, TOPICS, N_TOPIC[0], False, seed * 100 + 3, set())
    topic_test = make_labelled(
        topic_sentence, TOPICS, N_TOPIC[1], True, seed * 100 + 4, {t for t, _ in topic_train}
    )

    ner_rng = random.Random(seed * 100 + 5)
    ner: dict[bool, list[list[tuple[str, str]]]] = {False: [], True: []}
    ner_seen: set[str] = set()
    for test, n in ((False, N_NER[0]), (True, N_NER[1])):
        while len(ner[test]) < n:
            sent = ner_sentence(ner_rng, test)
            key = " ".join(tok for tok, _ in sent)
            if key not in ner_seen:
                ner_seen.add(key)
                ner[test].append(sent)

    # LM text: fresh train-style sentences from both generators, none from any shipped test split.
    lm_rng = random.Random(seed * 100 + 6)
    test_texts = {t for t, _ in sent_test} | {t for t, _ in topic_test}

    def lm_sentence() -> str:
        if lm_rng.random() < 0.6:
            return sentiment_sentence(lm_rng, lm_rng.choice(labels), False)
        return topic_sentence(lm_rng, lm_rng.choice(TOPICS), False)

    lm_lines = _unique(lm_sentence, N_LM, test_texts)

    files = {
        "sentiment_train.csv": lambda p: write_csv(p, sent_train),
        "sentiment_test.csv": lambda p: write_csv(p, sent_test),
        "sentiment_test.jsonl": lambda p: write_jsonl(p, sent_test),
        "topic_train.csv": lambda p: write_csv(p, topic_train),
        "topic_test.csv": lambda p: write_csv(p, topic_test),
        "ner_train.conll": lambda p: write_conll(p, ner[False]),
        "ner_test.conll": lambda p: write_conll(p, ner[True]),
        "lm_text.txt": lambda p: p.write_text("\n".join(lm_lines) + "\n", encoding="utf-8", newline=""),
        "README.md": lambda p: p.write_text(
            README.format(
                seed=seed,
                n_sent_train=N_SENTIMENT[0],
                n_sent_test=N_SENTIMENT[1],
                n_topic_train=N_TOPIC[0],
                n_topic_test=N_TOPIC[1],
                n_ner_train=N_NER[0],
                n_ner_test=N_NER[1],
                n_lm=N_LM,
            ),
            encoding="utf-8",
            newline="",
        ),
    }
    written = []
    for name, write in files.items():
        path = out_dir / name
        write(path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--seed", type=int, default=SEED, help=f"default: {SEED}")
    args = parser.parse_args(argv)
    for path in generate(args.out_dir, args.seed):
        print(f"{path}  {path.stat().st_size:>7} bytes")


if __name__ == "__main__":
    main()
