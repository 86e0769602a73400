"""A small instruction dataset whose reference answers are computed by code.

Every task record is a JSON-serializable dict::

    {"id": "arith-0007", "family": "arithmetic",
     "prompt": "What is 17 + 25? Answer with the number only.",
     "response": "42",
     "check": {"kind": "number", "answer": 42}}

``prompt``/``response`` make the records valid SFT data (:func:`load_sft`), and
:func:`check` grades a model's free-text answer against ``record["check"]``.

Families (all easy, with difficulty varying inside each family):

* ``arithmetic``  - add / subtract / multiply small integers
* ``counting``    - occurrences of a letter in a word; words in a sentence
* ``sorting``     - sort 4-6 small integers ascending, comma-separated
* ``formatting``  - convert a phrase to UPPERCASE; reverse the order of words
* ``extraction``  - pull the number / e-mail address / city out of a sentence
* ``sequence``    - next term of an arithmetic or geometric sequence

Probe families (``PROBE_FAMILIES``, the bundled ``probe`` split): tasks in templates the
six families above never use, for measuring what training on those costs elsewhere.
No training path reads them (the quality study, ``bench/quality.py``, uses them as its
general-ability probe):

* ``letters``   - the first or last letter of a word
* ``calendar``  - the weekday or month after / before a given one
* ``lists``     - how many items a list has; its last item
* ``compare``   - the larger or smaller of two numbers

Check kinds (``record["check"]["kind"]``):

* ``number``   - the first number in the answer equals ``answer`` (text after a
  last ``=`` is preferred, number words zero..twenty are accepted when there
  is no digit); optional ``max_words`` caps the answer length.
* ``int_list`` - the integers in the answer, in order, equal ``answer``
  (commas and/or spaces between them).
* ``exact``    - whitespace-normalized exact string match.
* ``token``    - ``answer`` occurs in the answer as a whole token,
  case-insensitively, and the answer has at most ``max_words`` words (so that
  echoing the whole source sentence does not count as extracting from it).
* ``choice``   - the words of the answer that are one of ``options`` and not one of
  ``exclude`` (the option the question itself names, e.g. "the day after Monday"),
  compared case-insensitively, are all ``answer`` (at least one; naming two options
  is no answer); at most ``max_words`` words.

Before checking, an answer is cleaned: the first line that is non-empty after
cleaning is used, surrounding quotes / backticks / asterisks, a trailing period
and prefixes such as ``Answer:`` or ``The answer is`` are removed.

``python -m sgdpo_fast.data.tasks --write`` regenerates the bundled files
(150 train and 50 held-out tasks per family: 900 and 300; 40 probe tasks per probe
family: 160; seed 0); ``--check`` verifies they are current.

:func:`styled_response` rewrites a reference answer in another style (``"bare"``, the
answer alone as the records hold it, or ``"sentence"``: ``The answer is X.``); both pass
the checker.  :func:`distractor` gives a wrong answer in the reference's format.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence

from .records import read_jsonl, write_jsonl

__all__ = [
    "FAMILIES",
    "PROBE_FAMILIES",
    "STYLES",
    "build_tasks",
    "build_probe",
    "styled_response",
    "distractor",
    "check",
    "accuracy",
    "bundled_path",
    "clean_answer",
    "main",
]

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")
BUNDLED_SPLITS = ("train", "heldout", "probe")
BUNDLED_N_TRAIN = 150
BUNDLED_N_HELDOUT = 50
BUNDLED_N_PROBE = 40
BUNDLED_SEED = 0


def bundled_path(split: str) -> str:
    """Path of a bundled task file: ``split`` is ``"train"``, ``"heldout"`` or ``"probe"``."""
    if split not in BUNDLED_SPLITS:
        raise ValueError(f"unknown bundled split {split!r}; expected one of {BUNDLED_SPLITS}")
    return os.path.join(BUNDLED_DIR, f"{split}.jsonl")


# ---------------------------------------------------------------------------
# Word pools
# ---------------------------------------------------------------------------

_NAMES = ["Maria", "John", "Anna", "Peter", "Laura", "David", "Emma", "Lucas", "Sofia",
          "Omar", "Priya", "Tom", "Nina", "Ivan", "Kenji", "Fatima", "Carlos", "Hannah",
          "Leo", "Grace", "Ahmed", "Mei", "Oscar", "Julia"]
_SURNAMES = ["smith", "garcia", "lee", "novak", "khan", "silva", "brown", "tanaka",
             "miller", "rossi", "kim", "evans"]
_DOMAINS = ["example.com", "mail.org", "company.net", "school.edu", "shop.io"]
_CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Toronto",
           "Chicago", "Sydney", "Mumbai", "Lisbon", "Vienna", "Dublin", "Oslo", "Seoul",
           "Boston", "Denver", "Prague", "Athens", "Nairobi", "Lima", "Kyoto", "Istanbul",
           "New York", "San Francisco", "Cape Town", "Buenos Aires", "Mexico City",
           "Los Angeles", "Hong Kong", "Rio de Janeiro"]
_ADJECTIVES = ["green", "small", "happy", "quiet", "bright", "cold", "old", "fast", "red",
               "blue", "soft", "heavy", "sunny", "little", "brave", "warm", "dark", "tall",
               "clean", "sweet", "loud", "young", "busy", "round"]
_NOUNS = ["apple", "river", "house", "dog", "cat", "book", "garden", "window", "train",
          "bird", "table", "cloud", "tree", "song", "road", "boat", "letter", "chair",
          "flower", "horse", "lamp", "coat", "bridge", "cake"]
_VERBS = ["runs", "sleeps", "sings", "waits", "jumps", "shines", "falls", "grows", "moves",
          "rests", "glows", "turns"]
_PLACES = ["the park", "the kitchen", "the morning", "the garden", "the city", "the rain",
           "the dark", "the house"]
_ITEMS = ["apples", "books", "tickets", "pencils", "cookies", "chairs", "stamps", "candles"]
# words with repeated letters, for the letter-counting tasks
_COUNT_WORDS = ["banana", "apple", "letter", "strawberry", "mississippi", "coffee", "balloon",
                "committee", "bookkeeper", "pepper", "cherry", "level", "hello", "tomato",
                "potato", "rabbit", "kitten", "puppy", "bubble", "success", "assess",
                "elephant", "parallel", "possession", "referee", "butter", "cabbage",
                "happiness", "address", "giraffe", "seventeen", "grammar", "tattoo",
                "bottle", "dinner", "summer", "cucumber", "papaya"]

_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


# ---------------------------------------------------------------------------
# Generators: each takes an rng and returns (prompt, response, check)
# ---------------------------------------------------------------------------

def _number_task(prompt: str, answer: int, **extra) -> tuple[str, str, dict]:
    return prompt, str(answer), {"kind": "number", "answer": answer, **extra}


def _gen_arithmetic(rng: random.Random):
    """Add, subtract or multiply; from single digits up to two-digit numbers."""
    op = rng.choice(["add1", "add1", "add2", "sub1", "sub2", "mul1", "mul2"])
    if op == "add1":
        a, b, sym = rng.randint(1, 9), rng.randint(1, 9), "+"
    elif op == "add2":
        a, b, sym = rng.randint(10, 99), rng.randint(2, 99), "+"
    elif op == "sub1":
        a = rng.randint(3, 20)
        b, sym = rng.randint(1, min(a, 9)), "-"
    elif op == "sub2":
        a = rng.randint(25, 99)
        b, sym = rng.randint(10, a), "-"
    elif op == "mul1":
        a, b, sym = rng.randint(2, 9), rng.randint(2, 9), "*"
    else:
        a, b, sym = rng.randint(11, 25), rng.randint(2, 9), "*"
    ans = a + b if sym == "+" else a - b if sym == "-" else a * b
    shown = "x" if sym == "*" else sym
    template = rng.choice([
        "What is {a} {s} {b}? Answer with the number only.",
        "Calculate {a} {s} {b}. Reply with just the number.",
        "Compute {a} {s} {b}. Give only the result.",
    ])
    return _number_task(template.format(a=a, s=shown, b=b), ans)


def _sentence(rng: random.Random) -> str:
    """A short, grammatical-looking sentence of 3 to 9 words."""
    words = ["The"] + rng.sample(_ADJECTIVES, rng.randint(0, 2)) + [rng.choice(_NOUNS),
                                                                   rng.choice(_VERBS)]
    if rng.random() < 0.6:
        words += ["in", *rng.choice(_PLACES).split()]
    return " ".join(words) + "."


def _gen_counting(rng: random.Random):
    """Count a letter in a word, or the words in a sentence."""
    if rng.random() < 0.5:
        word = rng.choice(_COUNT_WORDS)
        if rng.random() < 0.1:
            letter = rng.choice([c for c in "bdfgkmvwxz" if c not in word])
        else:
            letter = rng.choice(sorted(set(word)))
        prompt = (f'How many times does the letter "{letter}" appear in the word "{word}"? '
                  "Answer with the number only.")
        return _number_task(prompt, word.count(letter))
    sentence = _sentence(rng)
    prompt = (f'How many words are in this sentence: "{sentence}" '
              "Answer with the number only.")
    return _number_task(prompt, len(sentence.split()))


def _gen_sorting(rng: random.Random):
    """Sort 4-6 distinct small integers ascending."""
    n = rng.choice([4, 4, 5, 6])
    hi = rng.choice([9, 20, 50, 99])
    nums = rng.sample(range(0 if hi > 9 else 1, hi + 1), n)
    if nums == sorted(nums):  # never ask to sort an already sorted list
        nums.reverse()
    ordered = sorted(nums)
    prompt = ("Sort these numbers from smallest to largest: " + ", ".join(map(str, nums))
              + ". Answer with the sorted numbers separated by commas only.")
    return prompt, ", ".join(map(str, ordered)), {"kind": "int_list", "answer": ordered}


def _phrase(rng: random.Random, n_words: int) -> str:
    """A lowercase phrase of adjectives ending in a noun, ``n_words`` long."""
    return " ".join(rng.sample(_ADJECTIVES, n_words - 1) + [rng.choice(_NOUNS)])


def _gen_formatting(rng: random.Random):
    """Convert a phrase to UPPERCASE, or reverse the order of its words."""
    if rng.random() < 0.5:
        phrase = _phrase(rng, rng.choice([1, 2, 2, 3, 4]))
        prompt = (f'Convert this phrase to uppercase: "{phrase}". '
                  "Answer with the converted phrase only.")
        answer = phrase.upper()
    else:
        n = rng.choice([2, 3, 3, 4, 5])
        words = rng.sample(_ADJECTIVES + _NOUNS, n)
        phrase = " ".join(words)
        prompt = (f'Reverse the order of the words in "{phrase}". '
                  "Answer with the reversed words only.")
        answer = " ".join(reversed(words))
    return prompt, answer, {"kind": "exact", "answer": answer}


def _token_task(prompt: str, answer: str, sentence: str, kind: str = "token"):
    """A task graded by finding ``answer`` in a short reply (not an echo of ``sentence``)."""
    max_words = min(len(answer.split()) + 6, len(sentence.split()) - 1)
    check_ = {"kind": kind, "answer": int(answer) if kind == "number" else answer,
              "max_words": max_words}
    return prompt, answer, check_


def _gen_extraction(rng: random.Random):
    """Extract the number, the e-mail address or the city from a sentence."""
    what = rng.choice(["number", "email", "city"])
    name = rng.choice(_NAMES)
    if what == "number":
        n = rng.choice([rng.randint(2, 20), rng.randint(21, 999)])
        sentence = rng.choice([
            f"{name} bought {n} {rng.choice(_ITEMS)} at the market yesterday.",
            f"The train to the coast leaves in {n} minutes from platform B.",
            f"Our team scored {n} points in the game last night.",
            f"{name} has read {n} {rng.choice(['books', 'stories', 'poems'])} since the spring.",
            f"There are {n} {rng.choice(_ITEMS)} on the shelf in the hall.",
        ])
        prompt = (f'Extract the number from this sentence: "{sentence}" '
                  "Answer with the number only.")
        return _token_task(prompt, str(n), sentence, kind="number")
    if what == "email":
        first, last = name.lower(), rng.choice(_SURNAMES)
        local = rng.choice([f"{first}.{last}", f"{first}{rng.randint(1, 99)}", f"{first[0]}{last}"])
        email = f"{local}@{rng.choice(_DOMAINS)}"
        sentence = rng.choice([
            f"Please send the report to {email} before Friday.",
            f"You can reach {name} at {email} for any questions.",
            f"For tickets, write to {email} and wait for a reply.",
            f"{name} said the new address is {email} from now on.",
        ])
        prompt = (f'Extract the email address from this sentence: "{sentence}" '
                  "Answer with the email address only.")
        return _token_task(prompt, email, sentence)
    city = rng.choice(_CITIES)
    sentence = rng.choice([
        f"{name} moved to {city} last year to start a new job.",
        f"Last summer we spent two weeks in {city} with our friends.",
        f"The conference will take place in {city} next month.",
        f"{name} was born in {city} and still visits every winter.",
    ])
    prompt = (f'Which city is mentioned in this sentence: "{sentence}" '
              "Answer with the city name only.")
    return _token_task(prompt, city, sentence)


def _gen_sequence(rng: random.Random):
    """Next term of a counting-up, counting-down, doubling or tripling sequence."""
    kind = rng.choice(["up", "up", "down", "double", "triple"])
    n_terms = rng.choice([4, 5])
    if kind == "up":
        start, step = rng.randint(0, 30), rng.choice([1, 2, 2, 3, 5, 10, rng.randint(4, 9)])
        terms = [start + i * step for i in range(n_terms + 1)]
    elif kind == "down":
        step = rng.randint(2, 9)
        start = rng.randint(step * (n_terms + 1), 100)
        terms = [start - i * step for i in range(n_terms + 1)]
    else:
        factor = 2 if kind == "double" else 3
        start = rng.randint(1, 5 if factor == 2 else 3)
        terms = [start * factor ** i for i in range(n_terms + 1)]
    shown = ", ".join(map(str, terms[:-1]))
    template = rng.choice([
        "What number comes next in the sequence {s}, ...? Answer with the number only.",
        "Continue the sequence {s}. What is the next number? Answer with the number only.",
    ])
    return _number_task(template.format(s=shown), terms[-1])


# family name -> (id prefix, generator)
FAMILIES: dict[str, tuple[str, Callable[[random.Random], tuple[str, str, dict]]]] = {
    "arithmetic": ("arith", _gen_arithmetic),
    "counting": ("count", _gen_counting),
    "sorting": ("sort", _gen_sorting),
    "formatting": ("format", _gen_formatting),
    "extraction": ("extract", _gen_extraction),
    "sequence": ("seq", _gen_sequence),
}


# ---------------------------------------------------------------------------
# Probe families: other templates, never trained on (see the module docstring)
# ---------------------------------------------------------------------------

_LETTERS = list("abcdefghijklmnopqrstuvwxyz")
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"]
_LETTER_WORDS = sorted(set(_NOUNS + _ADJECTIVES + _COUNT_WORDS))


def _choice_task(prompt: str, answer: str, options: Sequence[str], max_words: int = 12,
                 exclude: Sequence[str] = ()):
    spec = {"kind": "choice", "answer": answer, "options": list(options), "max_words": max_words}
    if exclude:
        spec["exclude"] = list(exclude)
    return prompt, answer, spec


def _gen_letters(rng: random.Random):
    """The first or last letter of a word."""
    word = rng.choice(_LETTER_WORDS)
    first = rng.random() < 0.5
    template = rng.choice([
        'What is the {which} letter of the word "{word}"? Reply with the letter only.',
        'Tell me the {which} letter of "{word}". Just the letter, please.',
        'Which letter does the word "{word}" {verb} with? Give one letter.',
    ])
    prompt = template.format(which="first" if first else "last", word=word,
                             verb="start" if first else "end")
    return _choice_task(prompt, word[0] if first else word[-1], _LETTERS)


def _gen_calendar(rng: random.Random):
    """The weekday or month after / before a given one."""
    names = _WEEKDAYS if rng.random() < 0.5 else _MONTHS
    i = rng.randrange(len(names))
    after = rng.random() < 0.5
    answer = names[(i + (1 if after else -1)) % len(names)]
    unit = "day" if names is _WEEKDAYS else "month"
    template = rng.choice([
        "Which {unit} comes {rel} {x}? Reply with the name of the {unit} only.",
        "Name the {unit} that comes right {rel} {x}. One word, please.",
    ])
    prompt = template.format(unit=unit, rel="after" if after else "before", x=names[i])
    return _choice_task(prompt, answer, names, exclude=[names[i]])


def _gen_lists(rng: random.Random):
    """How many items a comma-separated list has, or which item is last."""
    items = rng.sample(_NOUNS + _ITEMS, rng.randint(3, 7))
    shown = ", ".join(items)
    if rng.random() < 0.5:
        template = rng.choice([
            "How many items are in this list: {s}? Reply with a number.",
            "Count the words in this list: {s}. Give the count only.",
        ])
        return _number_task(template.format(s=shown), len(items), max_words=10)
    template = rng.choice([
        "What is the last item in this list: {s}? Reply with the item only.",
        "Here is a list: {s}. Which item comes last? One word, please.",
    ])
    return _choice_task(template.format(s=shown), items[-1], items)


def _gen_compare(rng: random.Random):
    """The larger or smaller of two different numbers."""
    a, b = rng.sample(range(1, 1000 if rng.random() < 0.5 else 100), 2)
    larger = rng.random() < 0.5
    template = rng.choice([
        "Which number is {rel}: {a} or {b}? Reply with that number only.",
        "Of {a} and {b}, which one is {rel}? Give just the number.",
    ])
    prompt = template.format(rel="larger" if larger else "smaller", a=a, b=b)
    return _number_task(prompt, max(a, b) if larger else min(a, b), max_words=10)


PROBE_FAMILIES: dict[str, tuple[str, Callable[[random.Random], tuple[str, str, dict]]]] = {
    "letters": ("letter", _gen_letters),
    "calendar": ("cal", _gen_calendar),
    "lists": ("list", _gen_lists),
    "compare": ("cmp", _gen_compare),
}


# ---------------------------------------------------------------------------
# Building the dataset
# ---------------------------------------------------------------------------

def build_tasks(n_per_family_train: int, n_per_family_heldout: int,
                seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Generate ``(train, heldout)`` task records, deterministically for ``seed``.

    Each family draws from its own ``random.Random`` seeded with ``seed`` and the
    family name, held-out tasks first, so a family's tasks do not depend on the
    other families and the held-out split does not depend on the train size.
    Prompts are unique across both splits (hence the splits are disjoint).
    Train ids look like ``arith-0007``, held-out ids like ``arith-h0007``.
    """
    for name, n in (("n_per_family_train", n_per_family_train),
                    ("n_per_family_heldout", n_per_family_heldout)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    seen: set[str] = set()
    train: list[dict] = []
    heldout: list[dict] = []
    for family, (prefix, gen) in FAMILIES.items():
        rng = random.Random(f"{seed}:{family}")
        for n, out, tag in ((n_per_family_heldout, heldout, "h"), (n_per_family_train, train, "")):
            for i in range(n):
                prompt, response, check_ = _draw_unique(gen, rng, seen, family)
                out.append({"id": f"{prefix}-{tag}{i:04d}", "family": family,
                            "prompt": prompt, "response": response, "check": check_})
    return train, heldout


def build_probe(n_per_family: int, seed: int = 0) -> list[dict]:
    """Generate the probe tasks (``PROBE_FAMILIES``), deterministically for ``seed``; ids
    look like ``letter-p0007``.  Same record shape as :func:`build_tasks`."""
    if not isinstance(n_per_family, int) or isinstance(n_per_family, bool) or n_per_family < 0:
        raise ValueError(f"n_per_family must be a non-negative int, got {n_per_family!r}")
    seen: set[str] = set()
    out: list[dict] = []
    for family, (prefix, gen) in PROBE_FAMILIES.items():
        rng = random.Random(f"{seed}:probe:{family}")
        for i in range(n_per_family):
            prompt, response, check_ = _draw_unique(gen, rng, seen, family)
            out.append({"id": f"{prefix}-p{i:04d}", "family": family, "prompt": prompt,
                        "response": response, "check": check_})
    return out


def distractor(record: Mapping) -> str:
    """A wrong answer to a task ``record`` in the reference's own format (the checker
    rejects it): the other number of a comparison, the next option of a ``choice`` task
    (cycling, skipping the excluded ones), the list with its first two numbers swapped,
    the words of an ``exact`` answer in another order (or lower-cased), the answer plus
    one otherwise.  Scoring the reference against it by likelihood asks what the model
    knows without asking it to write in a given format."""
    spec = record["check"]
    kind, ans = spec["kind"], spec["answer"]
    if kind == "number":
        others = [int(x) for x in _INT.findall(record["prompt"]) if int(x) != ans]
        if record.get("family") == "compare" and others:
            return str(others[-1] if others[-1] != ans else others[0])
        return str(ans + 1)
    if kind == "int_list":
        return ", ".join(map(str, [ans[1], ans[0], *ans[2:]]))
    if kind == "choice":
        skip = {str(o).casefold() for o in spec.get("exclude", ())} | {str(ans).casefold()}
        opts = list(spec["options"])
        i = [str(o).casefold() for o in opts].index(str(ans).casefold())
        return next(o for o in opts[i + 1:] + opts[:i] if str(o).casefold() not in skip)
    if kind == "exact":
        words = str(ans).split()
        return " ".join(words[1:] + words[:1]) if len(set(words)) > 1 else str(ans).swapcase()
    if kind == "token":
        return "Atlantis" if "@" not in str(ans) else "x" + str(ans)
    raise ValueError(f"record {record.get('id', '?')!r}: unknown check kind {kind!r}")


STYLES = ("bare", "sentence")


def styled_response(record: Mapping, style: str = "bare") -> str:
    """The reference answer of a task ``record`` in ``style``: ``"bare"`` (the answer alone,
    as stored) or ``"sentence"`` (``The answer is X.``).  Both pass :func:`check`."""
    if style == "bare":
        return record["response"]
    if style == "sentence":
        return f"The answer is {record['response']}."
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _draw_unique(gen, rng: random.Random, seen: set[str], family: str, tries: int = 10_000):
    """Call ``gen(rng)`` until it yields a prompt not in ``seen``; record and return it."""
    for _ in range(tries):
        prompt, response, check_ = gen(rng)
        if prompt not in seen:
            seen.add(prompt)
            return prompt, response, check_
    raise ValueError(f"family {family!r} cannot produce that many distinct prompts")


# ---------------------------------------------------------------------------
# Checking answers
# ---------------------------------------------------------------------------

_PREFIXES = [
    re.compile(r"^(?:the\s+)?(?:final\s+|correct\s+)?answer\b\s*(?:is\b)?\s*"
               r"(?::|-(?=\s))?\s*", re.I),
    re.compile(r"^(?:output|result|response|a)\s*:\s*", re.I),
]
_WRAPPERS = "\"'`*\u201c\u201d\u2018\u2019"


def _clean_line(line: str) -> str:
    """Strip wrappers, ``Answer:``-style prefixes and a trailing period from one line."""
    text = " ".join(line.split())
    while True:
        before = text
        for pattern in _PREFIXES:
            text = pattern.sub("", text, count=1)
        text = text.strip().strip(_WRAPPERS).strip().rstrip(".").strip()
        if text == before:
            return text


def clean_answer(text: str | None) -> str:
    """The first line of ``text`` that is non-empty after cleaning (``""`` if none)."""
    for line in (text or "").splitlines():
        cleaned = _clean_line(line)
        if cleaned:
            return cleaned
    return ""


_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")
_INT = re.compile(r"-?\d+")


def _first_number(text: str) -> float | None:
    """First number in ``text`` (after a last ``=``, if any); number words as a fallback."""
    if "=" in text:
        after = text.rsplit("=", 1)[1]
        if _NUMBER.search(after):
            text = after
    m = _NUMBER.search(text)
    if m:
        return float(m.group())
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def _contains_token(text: str, answer: str) -> bool:
    """Whether ``answer`` occurs in ``text`` as a whole token, ignoring case."""
    pattern = (r"(?<![\w@.+-])" + r"\s+".join(map(re.escape, answer.split()))
               + r"(?![\w@+-]|\.\w)")
    return re.search(pattern, text, re.I) is not None


def _too_long(line: str, spec: Mapping) -> bool:
    max_words = spec.get("max_words")
    return max_words is not None and len(line.split()) > max_words


def check(record: Mapping, text: str | None) -> bool:
    """Whether a model's free-text answer ``text`` is correct for a task ``record``.

    Dispatches on ``record["check"]["kind"]``; see the module docstring for how
    answers are cleaned and compared.  Raises ValueError for an unknown kind.
    """
    spec = record.get("check")
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"record {record.get('id', '?')!r} has no 'check' spec")
    kind = spec["kind"]
    line = clean_answer(text)
    if kind == "number":
        if _too_long(line, spec):
            return False
        value = _first_number(line)
        return value is not None and value == float(spec["answer"])
    if kind == "int_list":
        return [int(x) for x in _INT.findall(line)] == [int(x) for x in spec["answer"]]
    if kind == "exact":
        return line == " ".join(str(spec["answer"]).split())
    if kind == "token":
        return bool(line) and not _too_long(line, spec) and _contains_token(line, spec["answer"])
    if kind == "choice":
        if _too_long(line, spec):
            return False
        options = ({str(o).casefold() for o in spec["options"]}
                   - {str(o).casefold() for o in spec.get("exclude", ())})
        named = {w.casefold() for w in re.findall(r"[^\W\d_]+", line)} & options
        return named == {str(spec["answer"]).casefold()}
    raise ValueError(f"record {record.get('id', '?')!r}: unknown check kind {kind!r}")


def accuracy(records: Sequence[Mapping], answers: Sequence[str] | Mapping[str, str]) -> dict:
    """Grade ``answers`` against ``records``.

    ``answers`` is a list aligned with ``records`` or a mapping from record id
    to answer text (a missing id counts as wrong).  Returns
    ``{"overall": float, "by_family": {family: float}, "n": int}``.
    """
    if not records:
        raise ValueError("accuracy() needs at least one record")
    if isinstance(answers, Mapping):
        texts = [answers.get(r["id"]) for r in records]
    else:
        texts = list(answers)
        if len(texts) != len(records):
            raise ValueError(f"{len(texts)} answers for {len(records)} records")
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for rec, text in zip(records, texts):
        fam = rec["family"]
        total[fam] = total.get(fam, 0) + 1
        right[fam] = right.get(fam, 0) + bool(text is not None and check(rec, text))
    return {
        "overall": sum(right.values()) / len(records),
        "by_family": {fam: right[fam] / total[fam] for fam in total},
        "n": len(records),
    }


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _bundled_tasks() -> dict[str, list[dict]]:
    train, heldout = build_tasks(BUNDLED_N_TRAIN, BUNDLED_N_HELDOUT, seed=BUNDLED_SEED)
    return {"train": train, "heldout": heldout,
            "probe": build_probe(BUNDLED_N_PROBE, seed=BUNDLED_SEED)}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sgdpo_fast.data.tasks [--write | --check]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sgdpo_fast.data.tasks",
        description="Code-checked instruction tasks: show examples, or (re)write / verify "
                    f"the bundled files ({BUNDLED_N_TRAIN} train + {BUNDLED_N_HELDOUT} "
                    f"held-out per family, {BUNDLED_N_PROBE} per probe family, "
                    f"seed {BUNDLED_SEED}).")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="regenerate the bundled files")
    group.add_argument("--check", action="store_true",
                       help="exit 1 if the bundled files differ from what the code generates")
    parser.add_argument("--dir", default=BUNDLED_DIR,
                        help="folder of the <split>.jsonl files (default: the package's)")
    args = parser.parse_args(argv)

    splits = _bundled_tasks()
    path = {s: os.path.join(args.dir, f"{s}.jsonl") for s in splits}
    if args.write:
        for split, recs in splits.items():
            print(f"wrote {len(recs)} records to {write_jsonl(path[split], recs)}")
        return 0
    if args.check:
        stale = [s for s, recs in splits.items()
                 if not os.path.exists(path[s]) or read_jsonl(path[s]) != recs]
        for s in stale:
            print(f"{path[s]} is out of date; run python -m sgdpo_fast.data.tasks --write")
        return 1 if stale else 0
    shown = set()
    for rec in splits["train"] + splits["probe"]:
        if rec["family"] not in shown:
            shown.add(rec["family"])
            print(f"[{rec['id']}] {rec['prompt']}\n    -> {rec['response']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
