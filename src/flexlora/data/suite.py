"""The built-in task suite: the default data of ``make demo`` (no download, pure Python, seeded).

It mimics the Natural Instructions setting at toy scale: one task per client, each task given by a
natural-language definition (``Example.instruction``), tasks grouped in categories, and held-out
tasks that are *different* tasks from the training ones but share their categories, so zero-shot
transfer to them is meaningful. Inputs are under 100 characters and outputs a few tokens, because
the demo trains and generates with a 135M model on CPU.

Tasks (40 in 8 categories; the task marked * is the default held-out task of its category, the
one marked ** is held out second when ``heldout_tasks`` > 8):

* String Manipulation: uppercase, reverse_words, remove_vowels, acronym**, spell_backwards*
* Word Selection: first_word, longest_word, sort_words, alphabetical_first**, last_word*
* Counting: count_words, count_letters, count_letter, count_even**, count_vowels*
* Arithmetic: add, multiply, larger, double**, subtract*
* List Processing: max_number, sort_numbers, dedupe, sum_list**, min_number*
* Formatting: comma_list, json_key_value, iso_date, snake_case**, camel_case*
* Classification: sentiment, is_animal, is_colour, even_odd**, is_fruit*
* Word Transforms: plural, number_to_words, antonym, comparative**, past_tense*

Held-out tasks are chosen by rounds from the end of each category's list, categories in the order
above (``heldout_tasks=3`` holds out spell_backwards, last_word, count_vowels); every category keeps
at least one training task. Training clients cycle through the remaining tasks round-robin across
categories (client 0: uppercase, client 1: first_word, ...), so the first 8 clients span all
categories; with more clients than tasks,
several clients share a task with different random instances. Each client's instances come from
its own ``random.Random`` seeded by (seed, client id, task), and its eval inputs never occur in its
training inputs. Client ``flags`` carry the task name as ``"task:<name>"``.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from flexlora.data.types import ClientData, Example
from flexlora.seeds import labelled_random

Generator = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class SuiteTask:
    """One task: ``generate(rng) -> (input, output)`` draws a random instance."""

    name: str
    category: str
    instruction: str
    generate: Generator


# ----------------------------------------------------------------------------------------------
# Built-in vocabularies (lowercase ASCII; chosen so every class/answer is unambiguous)

_ANIMALS = (
    "cat dog horse cow sheep goat pig lion tiger bear wolf fox rabbit mouse deer zebra giraffe elephant monkey "
    "camel donkey kangaroo koala panda otter beaver squirrel hedgehog dolphin whale shark owl eagle parrot "
    "penguin duck goose swan frog snake turtle lizard spider bee ant"
).split()
_COLOURS = (
    "red blue green yellow purple pink brown black white gray violet indigo cyan magenta beige maroon navy "
    "turquoise crimson scarlet"
).split()
_FRUITS = (
    "apple banana grape mango pear melon lemon papaya coconut pineapple watermelon strawberry "
    "blueberry raspberry guava lychee"
).split()
_OBJECTS = (
    "table chair lamp window door book pencil bottle cup spoon fork knife plate shoe hat jacket phone clock "
    "mirror pillow candle basket bucket ladder hammer bridge road house tower river mountain cloud train boat "
    "car bicycle guitar piano drum kettle blanket wallet"
).split()
_ADJECTIVES = (
    "big small quiet loud quick slow warm cold dark bright soft heavy round empty clean tall gentle brave "
    "calm proud lazy busy happy"
).split()
_VERBS = "walk jump read write sing play cook paint swim climb dance build carry watch listen travel".split()
_WORDS = tuple(dict.fromkeys(_ANIMALS + _COLOURS + _FRUITS + _OBJECTS + _ADJECTIVES + _VERBS))

_POSITIVE = "wonderful great excellent lovely delightful brilliant amazing pleasant charming superb fantastic cheerful".split()
_NEGATIVE = "terrible awful horrible boring dreadful disappointing nasty dull annoying miserable unpleasant rude".split()
_REVIEWED = "movie meal day trip book song hotel game show concert party room view service visit lesson".split()
_SENTIMENT_TEMPLATES = ("a {adj} {noun}", "the {noun} was {adj}", "what a {adj} {noun}", "a really {adj} {noun}", "such a {adj} {noun}")

_PLURALS = {
    **{w: w + "s" for w in "cat dog book tree car house apple river chair table girl boy bird lamp road door hat shoe song farm".split()},
    **{w: w + "es" for w in "box fox bus dish church watch brush glass class bench tomato potato hero".split()},
    **{w: w[:-1] + "ies" for w in "city baby story party lady puppy cherry country family berry".split()},
    "child": "children", "mouse": "mice", "man": "men", "woman": "women", "foot": "feet", "tooth": "teeth",
    "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "half": "halves",
    "sheep": "sheep", "fish": "fish", "deer": "deer", "ox": "oxen", "cactus": "cacti", "shelf": "shelves",
}  # fmt: skip
_PAST = {
    **{w: w + "ed" for w in "walk play jump cook open watch clean help call ask paint listen visit climb wash kick".split()},
    **{w: w + "d" for w in "dance smile like live move bake close share".split()},
    **{w: w[:-1] + "ied" for w in "carry study try cry hurry worry".split()},
    "stop": "stopped", "plan": "planned", "drop": "dropped", "go": "went", "see": "saw", "eat": "ate",
    "take": "took", "give": "gave", "write": "wrote", "drive": "drove", "run": "ran", "swim": "swam",
    "sing": "sang", "drink": "drank", "begin": "began", "come": "came", "make": "made", "say": "said",
    "think": "thought", "buy": "bought", "bring": "brought", "teach": "taught", "catch": "caught",
    "fly": "flew", "know": "knew", "grow": "grew", "throw": "threw", "draw": "drew", "sleep": "slept",
    "keep": "kept", "feel": "felt", "meet": "met", "sit": "sat", "find": "found", "build": "built",
    "send": "sent", "stand": "stood", "speak": "spoke", "break": "broke", "choose": "chose", "forget": "forgot",
    "win": "won", "tell": "told", "sell": "sold", "hold": "held", "cut": "cut", "put": "put",
}  # fmt: skip
_ANTONYM_PAIRS = (
    "hot cold", "big small", "up down", "fast slow", "happy sad", "early late", "full empty", "wet dry",
    "rich poor", "strong weak", "thick thin", "inside outside", "above below", "win lose", "buy sell",
    "push pull", "true false", "day night", "first last", "clean dirty", "loud quiet", "safe dangerous",
    "cheap expensive", "wide narrow", "deep shallow", "love hate", "always never", "before after",
    "north south", "east west", "top bottom", "friend enemy", "remember forget", "accept refuse",
)  # fmt: skip
_ANTONYMS = {a: b for pair in _ANTONYM_PAIRS for a, b in (pair.split(), pair.split()[::-1])}
_COMPARATIVES = {
    **{w: w + "er" for w in (
        "small tall fast slow cold young old strong warm cheap loud quiet dark bright long short deep clean rich poor soft "
        "hard kind calm"
    ).split()},
    **{w: w + "r" for w in "nice large safe wide brave simple late".split()},
    **{w: w[:-1] + "ier" for w in "happy easy busy funny heavy early tiny angry".split()},
    "big": "bigger", "hot": "hotter", "thin": "thinner", "wet": "wetter", "sad": "sadder",
    "good": "better", "bad": "worse", "far": "farther",
    **{w: "more " + w for w in "beautiful careful expensive famous difficult important interesting dangerous".split()},
}  # fmt: skip
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_JSON_VALUES = {
    "name": ("Alice", "Bob", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas"),
    "city": ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Delhi", "Quito", "Seoul", "Berlin"),
    "color": tuple(c.capitalize() for c in _COLOURS),
    "animal": tuple(a.capitalize() for a in _ANIMALS),
    "fruit": tuple(f.capitalize() for f in _FRUITS),
    "food": ("Pizza", "Rice", "Soup", "Bread", "Salad", "Pasta", "Tacos", "Curry", "Noodles", "Cheese"),
    "country": ("Chile", "Kenya", "Spain", "Japan", "Peru", "Norway", "Egypt", "India", "Canada", "Brazil"),
}
_MONTHS = tuple(calendar.month_name)[1:]


# ----------------------------------------------------------------------------------------------
# Generators


def _words(rng: random.Random, lo: int, hi: int, pool: tuple[str, ...] = _WORDS) -> list[str]:
    return rng.sample(pool, rng.randint(lo, hi))


def _numbers(rng: random.Random, lo: int, hi: int, top: int = 20) -> list[int]:
    return [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]


def _fmt(nums: list[int]) -> str:
    return ", ".join(map(str, nums))


def _number_words(n: int) -> str:
    """0..999 in American English words without "and" (342 -> "three hundred forty-two")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + _number_words(rest))


def _unique_extreme(rng: random.Random, key: Callable[[str], object], pick_max: bool) -> tuple[list[str], str]:
    """Words whose max/min under ``key`` is unique (so the answer is unambiguous)."""
    while True:
        ws = _words(rng, 3, 5)
        keys = [key(w) for w in ws]
        best = max(keys) if pick_max else min(keys)
        if keys.count(best) == 1:
            return ws, ws[keys.index(best)]


def _g_uppercase(rng: random.Random) -> tuple[str, str]:
    s = " ".join(_words(rng, 2, 4))
    return s, s.upper()


def _g_reverse_words(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 5)
    return " ".join(ws), " ".join(reversed(ws))


def _g_remove_vowels(rng: random.Random) -> tuple[str, str]:
    s = " ".join(_words(rng, 1, 2))
    return s, "".join(ch for ch in s if ch not in "aeiou")


def _g_acronym(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 5)
    return " ".join(ws), "".join(w[0] for w in ws).upper()


def _g_spell_backwards(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    return w, w[::-1]


def _g_first_word(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 6)
    return " ".join(ws), ws[0]


def _g_last_word(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 6)
    return " ".join(ws), ws[-1]


def _g_longest_word(rng: random.Random) -> tuple[str, str]:
    ws, best = _unique_extreme(rng, len, pick_max=True)
    return " ".join(ws), best


def _g_alphabetical_first(rng: random.Random) -> tuple[str, str]:
    ws, best = _unique_extreme(rng, lambda w: w, pick_max=False)
    return " ".join(ws), best


def _g_sort_words(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 3, 5)
    return " ".join(ws), " ".join(sorted(ws))


def _g_count_words(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 7)
    return " ".join(ws), str(len(ws))


def _g_count_letters(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    return w, str(len(w))


def _g_count_letter(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"word: {w}, letter: {letter}", str(w.count(letter))


def _g_count_vowels(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_WORDS)
    return w, str(sum(ch in "aeiou" for ch in w))


def _g_count_even(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 6)
    return _fmt(nums), str(sum(n % 2 == 0 for n in nums))


def _g_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return f"{a} and {b}", str(a + b)


def _g_multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a} and {b}", str(a * b)


def _g_larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(100), 2)
    return f"{a} and {b}", str(max(a, b))


def _g_double(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(1, 99)
    return str(a), str(2 * a)


def _g_subtract(rng: random.Random) -> tuple[str, str]:
    a, b = sorted(rng.sample(range(100), 2), reverse=True)
    return f"{a} and {b}", str(a - b)


def _g_max_number(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 6, 99)
    return _fmt(nums), str(max(nums))


def _g_min_number(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 6, 99)
    return _fmt(nums), str(min(nums))


def _g_sort_numbers(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 5, 50)
    return _fmt(nums), _fmt(sorted(nums))


def _g_dedupe(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 5, 9)
    nums.insert(rng.randint(0, len(nums)), rng.choice(nums))  # at least one duplicate
    return _fmt(nums), _fmt(list(dict.fromkeys(nums)))


def _g_sum_list(rng: random.Random) -> tuple[str, str]:
    nums = _numbers(rng, 3, 4, 9)
    return _fmt(nums), str(sum(nums))


def _g_comma_list(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 5)
    return " ".join(ws), ", ".join(ws)


def _g_json_key_value(rng: random.Random) -> tuple[str, str]:
    key = rng.choice(sorted(_JSON_VALUES))
    value = rng.choice(_JSON_VALUES[key])
    return f"key: {key}, value: {value}", json.dumps({key: value})


def _g_iso_date(rng: random.Random) -> tuple[str, str]:
    year, month = rng.randint(1990, 2030), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return f"{_MONTHS[month - 1]} {day}, {year}", f"{year:04d}-{month:02d}-{day:02d}"


def _g_snake_case(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 4)
    return " ".join(ws), "_".join(ws)


def _g_camel_case(rng: random.Random) -> tuple[str, str]:
    ws = _words(rng, 2, 4)
    return " ".join(ws), ws[0] + "".join(w.capitalize() for w in ws[1:])


def _g_sentiment(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
    text = rng.choice(_SENTIMENT_TEMPLATES).format(adj=adj, noun=rng.choice(_REVIEWED))
    return text, "positive" if positive else "negative"


def _membership(members: list[str]) -> Generator:
    others = tuple(w for w in _ANIMALS + _COLOURS + _FRUITS + _OBJECTS if w not in members)
    pool = tuple(members)

    def generate(rng: random.Random) -> tuple[str, str]:
        yes = rng.random() < 0.5
        return rng.choice(pool if yes else others), "yes" if yes else "no"

    return generate


def _g_even_odd(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 9999)
    return str(n), "even" if n % 2 == 0 else "odd"


def _table(table: dict[str, str]) -> Generator:
    keys = tuple(table)

    def generate(rng: random.Random) -> tuple[str, str]:
        k = rng.choice(keys)
        return k, table[k]

    return generate


def _g_number_to_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return str(n), _number_words(n)


_SM, _WS, _CT, _AR, _LP, _FM, _CL, _WT = (
    "String Manipulation", "Word Selection", "Counting", "Arithmetic",
    "List Processing", "Formatting", "Classification", "Word Transforms",
)  # fmt: skip

# Category order and, within each category, the order that decides held-out tasks (from the end).
SUITE_TASKS: tuple[SuiteTask, ...] = (
    SuiteTask("uppercase", _SM, "Rewrite the text in uppercase letters.", _g_uppercase),
    SuiteTask("reverse_words", _SM, "Reverse the order of the words. Keep each word unchanged.", _g_reverse_words),
    SuiteTask("remove_vowels", _SM, "Remove every vowel (a, e, i, o, u) from the text and keep everything else.", _g_remove_vowels),
    SuiteTask("acronym", _SM, "Write the first letter of each word in uppercase, joined into one acronym.", _g_acronym),
    SuiteTask("spell_backwards", _SM, "Spell the word backwards, letter by letter.", _g_spell_backwards),
    SuiteTask("first_word", _WS, "Return the first word of the text.", _g_first_word),
    SuiteTask("longest_word", _WS, "Return the longest word in the text.", _g_longest_word),
    SuiteTask("sort_words", _WS, "Sort the words in alphabetical order, separated by spaces.", _g_sort_words),
    SuiteTask("alphabetical_first", _WS, "Return the word that comes first in alphabetical order.", _g_alphabetical_first),
    SuiteTask("last_word", _WS, "Return the last word of the text.", _g_last_word),
    SuiteTask("count_words", _CT, "How many words are in the text? Answer with a number.", _g_count_words),
    SuiteTask("count_letters", _CT, "How many letters does the word have? Answer with a number.", _g_count_letters),
    SuiteTask("count_letter", _CT, "How many times does the given letter occur in the given word? Answer with a number.", _g_count_letter),
    SuiteTask("count_even", _CT, "How many of the numbers are even? Answer with a number.", _g_count_even),
    SuiteTask("count_vowels", _CT, "How many vowels (a, e, i, o, u) does the word have? Answer with a number.", _g_count_vowels),
    SuiteTask("add", _AR, "Add the two numbers.", _g_add),
    SuiteTask("multiply", _AR, "Multiply the two numbers.", _g_multiply),
    SuiteTask("larger", _AR, "Which of the two numbers is larger? Answer with that number.", _g_larger),
    SuiteTask("double", _AR, "Double the number.", _g_double),
    SuiteTask("subtract", _AR, "Subtract the second number from the first.", _g_subtract),
    SuiteTask("max_number", _LP, "Return the largest number in the list.", _g_max_number),
    SuiteTask("sort_numbers", _LP, "Sort the numbers from smallest to largest, separated by commas.", _g_sort_numbers),
    SuiteTask("dedupe", _LP, "Remove repeated numbers from the list, keeping the first occurrence of each.", _g_dedupe),
    SuiteTask("sum_list", _LP, "Return the sum of the numbers in the list.", _g_sum_list),
    SuiteTask("min_number", _LP, "Return the smallest number in the list.", _g_min_number),
    SuiteTask("comma_list", _FM, "Join the words into a list separated by commas.", _g_comma_list),
    SuiteTask("json_key_value", _FM, "Write a JSON object with the given key and value.", _g_json_key_value),
    SuiteTask("iso_date", _FM, "Write the date in ISO format (YYYY-MM-DD).", _g_iso_date),
    SuiteTask("snake_case", _FM, "Convert the words to snake_case.", _g_snake_case),
    SuiteTask("camel_case", _FM, "Convert the words to camelCase.", _g_camel_case),
    SuiteTask("sentiment", _CL, "Is the sentiment of the phrase positive or negative?", _g_sentiment),
    SuiteTask("is_animal", _CL, "Is the word an animal? Answer yes or no.", _membership(_ANIMALS)),
    SuiteTask("is_colour", _CL, "Is the word a colour? Answer yes or no.", _membership(_COLOURS)),
    SuiteTask("even_odd", _CL, "Is the number even or odd?", _g_even_odd),
    SuiteTask("is_fruit", _CL, "Is the word a fruit? Answer yes or no.", _membership(_FRUITS)),
    SuiteTask("plural", _WT, "Write the plural form of the noun.", _table(_PLURALS)),
    SuiteTask("number_to_words", _WT, "Write the number in English words.", _g_number_to_words),
    SuiteTask("antonym", _WT, "Write the opposite of the word.", _table(_ANTONYMS)),
    SuiteTask("comparative", _WT, "Write the comparative form of the adjective.", _table(_COMPARATIVES)),
    SuiteTask("past_tense", _WT, "Write the past tense of the verb.", _table(_PAST)),
)
SUITE_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(t.category for t in SUITE_TASKS))
DEFAULT_HELDOUT_TASKS = len(SUITE_CATEGORIES)


def _by_category() -> dict[str, list[SuiteTask]]:
    groups: dict[str, list[SuiteTask]] = {c: [] for c in SUITE_CATEGORIES}
    for task in SUITE_TASKS:
        groups[task.category].append(task)
    return groups


def split_tasks(heldout_tasks: int | None = None) -> tuple[list[SuiteTask], list[SuiteTask]]:
    """(training tasks in client round-robin order, held-out tasks); see the module docstring."""
    groups = _by_category()
    k = DEFAULT_HELDOUT_TASKS if heldout_tasks is None else heldout_tasks
    max_k = len(SUITE_TASKS) - len(groups)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= max_k:
        raise ValueError(f"heldout_tasks must be an integer in [0, {max_k}] (each category keeps a training task), got {heldout_tasks!r}")
    held: list[SuiteTask] = []
    round_ = 0
    while len(held) < k:
        for tasks in groups.values():
            if len(held) < k and len(tasks) - 1 - round_ >= 1:
                held.append(tasks[len(tasks) - 1 - round_])
        round_ += 1
    held_names = {t.name for t in held}
    remaining = [[t for t in tasks if t.name not in held_names] for tasks in groups.values()]
    train = [tasks[i] for i in range(max(map(len, remaining))) for tasks in remaining if i < len(tasks)]
    return train, held


def _draw(task: SuiteTask, rng: random.Random, n_train: int, n_eval: int, where: str) -> tuple[list[Example], list[Example]]:
    """Eval instances with distinct inputs, then training instances whose inputs avoid the eval ones
    (distinct while the task's input space allows, repeats after that)."""
    seen: set[str] = set()
    evals: list[Example] = []
    misses = 0
    while len(evals) < n_eval:
        inp, out = task.generate(rng)
        if inp in seen:
            misses += 1
            if misses > 2000:
                raise ValueError(f"{where}: task {task.name!r} cannot give {n_eval} distinct eval inputs; lower eval_per_client")
            continue
        seen.add(inp)
        evals.append(Example(task.instruction, inp, out))
    eval_inputs = set(seen)
    train: list[Example] = []
    misses = 0
    while len(train) < n_train:
        inp, out = task.generate(rng)
        repeat_ok = misses > 200  # the input space is (nearly) exhausted: allow training repeats
        if inp in eval_inputs or (inp in seen and not repeat_ok):
            misses += 1
            if misses > 5000:
                raise ValueError(f"{where}: task {task.name!r} has no training inputs left besides its eval inputs")
            continue
        seen.add(inp)
        train.append(Example(task.instruction, inp, out))
    return train, evals


def _sizes(n_clients: int, mean: int, rng: random.Random) -> list[int]:
    """Varied training sizes averaging ``mean`` (multipliers spread evenly over [0.25, 1.75], shuffled)."""
    if n_clients == 1:
        return [mean]
    mult = [0.25 + 1.5 * i / (n_clients - 1) for i in range(n_clients)]
    rng.shuffle(mult)
    return [max(1, int(mean * m + 0.5)) for m in mult]


def make_suite(
    num_train_clients: int,
    examples_per_client: int,
    eval_per_client: int,
    seed: int,
    heldout_tasks: int | None = None,
) -> list[ClientData]:
    """The demo federation: ``num_train_clients`` training clients (ids 0..n-1, training sizes
    varying from ~0.25x to ~1.75x ``examples_per_client`` so data-size weighting matters), then one
    held-out client per held-out task (``heldout=True``, ``examples_per_client`` training examples that
    must not be used for federated training, and ``eval_per_client`` eval examples).

    ``heldout_tasks`` defaults to one per category (8). Deterministic for a seed.
    """
    sizes_in = {"num_train_clients": num_train_clients, "examples_per_client": examples_per_client, "eval_per_client": eval_per_client}
    for name, value in sizes_in.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    train_tasks, held_tasks = split_tasks(heldout_tasks)
    sizes = _sizes(num_train_clients, examples_per_client, labelled_random(f"flexlora-suite-sizes:{seed}"))
    plan = [(train_tasks[i % len(train_tasks)], sizes[i], False) for i in range(num_train_clients)]
    plan += [(task, examples_per_client, True) for task in held_tasks]
    clients = []
    for cid, (task, n_train, heldout) in enumerate(plan):
        rng = labelled_random(f"flexlora-suite:{seed}:{cid}:{task.name}")
        train, evals = _draw(task, rng, n_train, eval_per_client, f"client {cid}")
        clients.append(
            ClientData(
                client_id=cid,
                category=task.category,
                train=train,
                eval=evals,
                num_train_full=len(train),
                heldout=heldout,
                flags=[f"task:{task.name}"],
            )
        )
    return clients
