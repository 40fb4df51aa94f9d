"""Write conca's shipped labelled tasks (src/conca/data/tasks/*.jsonl) from word lists and templates.

Deterministic: every task has its own seeded `random.Random`, so running this again writes byte-identical
files (tests/evaluation/test_tasks.py checks that the shipped files are what this script builds). Nothing is
downloaded: every sentence is assembled here from the lists below, written for conca (CC0 1.0).

Run from the repository root: ``python scripts/make_tasks.py`` (or ``--out DIR`` to write elsewhere).

Each task is balanced (the same number of examples per class), its texts are unique, and the lines are
shuffled. What each task holds, its label meaning and its known shortcuts: src/conca/data/tasks/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

PER_TASK = 1000  # examples per task, split evenly over its classes
OUT = Path(__file__).resolve().parents[1] / "src" / "conca" / "data" / "tasks"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- sentiment: reviews whose last clause decides ------------------------------------------------------------
DOMAINS = {
    "film": (["the film", "this movie", "the sequel", "the documentary", "the new series", "the remake",
              "the animated feature", "the thriller"],
             ["the acting", "the soundtrack", "the ending", "the plot", "the dialogue", "the camera work",
              "the pacing", "the lead actress"]),
    "restaurant": (["the restaurant", "this café", "the pizza place", "the diner", "the noodle bar",
                    "the bakery on the corner", "the new bistro", "the food truck"],
                   ["the service", "the food", "the dessert", "the coffee", "the menu", "the waiter",
                    "the atmosphere", "the portion size"]),
    "product": (["this blender", "the speaker", "the laptop", "this vacuum cleaner", "the backpack",
                 "the phone case", "this kettle", "the office chair"],
                ["the battery", "the build quality", "the price", "the design", "the sound",
                 "the delivery", "the manual", "the customer support"]),
    "hotel": (["the hotel", "our room", "the resort", "the guest house", "the campsite", "the hostel",
               "the holiday flat", "the spa"],
              ["the staff", "the breakfast", "the view", "the bed", "the pool", "the location",
               "the check-in", "the bathroom"]),
    "book": (["the novel", "this cookbook", "the biography", "the short story collection", "the textbook",
              "the memoir", "the poetry book", "the detective story"],
             ["the writing", "the characters", "the last chapter", "the translation", "the cover",
              "the first half", "the humour", "the index"]),
}
POSITIVE = ["wonderful", "excellent", "delightful", "superb", "great", "fantastic", "charming", "impressive",
            "lovely", "brilliant", "pleasant", "outstanding", "solid", "enjoyable", "refreshing", "well made"]
NEGATIVE = ["terrible", "awful", "disappointing", "dull", "poor", "mediocre", "frustrating", "bland",
            "tedious", "dreadful", "unpleasant", "flimsy", "annoying", "forgettable", "overpriced", "sloppy"]
LIKES = {"positive": ["loved", "enjoyed", "adored", "really liked", "told everyone about"],
         "negative": ["hated", "disliked", "regretted choosing", "was fed up with", "warned everyone about"]}
PEOPLE = ["I", "we", "my sister", "our friends", "my father", "the whole family", "my colleague", "everyone I know"]
OPENERS = ["", "", "", "Honestly, ", "To be fair, ", "In short, ", "All in all, ", "Frankly, ", "Well, "]
ADVERBS = ["", "", "really ", "truly ", "quite ", "rather ", "surprisingly "]
TIMES = ["a week", "a month", "two months", "a year", "three visits", "a long weekend"]


def _sentiment(rng: random.Random, label: str) -> str:
    other = "negative" if label == "positive" else "positive"
    words = {"positive": POSITIVE, "negative": NEGATIVE}
    subjects, aspects = DOMAINS[rng.choice(sorted(DOMAINS))]
    subj, aspect, aspect2 = rng.choice(subjects), *rng.sample(aspects, 2)

    def adj(side: str) -> str:
        return rng.choice(ADVERBS) + rng.choice(words[side])

    templates = [
        lambda: f"{subj} was {adj(label)}, and {aspect} was {rng.choice(words[label])} too.",
        lambda: f"I expected {subj} to be {rng.choice(words[other])}, but it turned out to be {adj(label)}.",
        lambda: f"{aspect} was {rng.choice(words[other])} at first, but overall {subj} was {adj(label)}.",
        lambda: f"{subj} was not {rng.choice(words[other])} at all; {aspect} was {adj(label)}.",
        lambda: f"{rng.choice(PEOPLE)} {rng.choice(LIKES[label])} {subj}, mostly because {aspect} was {adj(label)}.",
        lambda: f"After {rng.choice(TIMES)}, {subj} still feels {adj(label)}.",
        lambda: f"Everyone said {subj} was {rng.choice(words[other])}, yet I found {aspect} {adj(label)}.",
        lambda: f"Despite {aspect}, which was {rng.choice(words[other])}, {subj} was {adj(label)} in the end.",
        lambda: f"{aspect} was {adj(label)} and {aspect2} was {rng.choice(words[label])}, so {subj} "
                + ("earns my vote." if label == "positive" else "loses my vote."),
    ]
    body, opener = rng.choice(templates)(), rng.choice(OPENERS)
    if opener and not body.startswith("I "):
        body = body[:1].lower() + body[1:]
    return _cap(opener + body)


# --- topic: one set of templates, the topic's own nouns and verbs --------------------------------------------
TOPICS = {
    "sports": {
        "agents": ["the coach", "the striker", "the goalkeeper", "the team captain", "the referee", "the young sprinter",
                   "the tennis champion", "the club manager", "the cyclist", "the home fans"],
        "things": ["the match", "the penalty", "the championship", "the final", "the season", "the transfer",
                   "the league table", "the relay race", "the marathon", "the second half", "the training camp",
                   "the world record"],
        "actions": ["played well in", "trained hard for", "celebrated", "talked to reporters after",
                    "was injured before", "watched the highlights of", "warmed up before"],
        "places": ["at the stadium", "on the pitch", "at the track", "in the locker room", "at the arena"],
    },
    "science": {
        "agents": ["the researchers", "the chemist", "the physicist", "the lab team", "the biologist",
                   "the astronomer", "the graduate student", "the geologist", "the research group", "the professor"],
        "things": ["the experiment", "the telescope data", "the protein structure", "the new vaccine",
                   "the particle detector", "the climate model", "the genome", "the fossil", "the sample",
                   "the hypothesis", "the microscope images", "the reaction"],
        "actions": ["studied", "published a paper on", "tested", "repeated", "presented", "analysed",
                    "double-checked"],
        "places": ["in the lab", "at the observatory", "at the field station", "in the clean room",
                   "at the university"],
    },
    "cooking": {
        "agents": ["the chef", "the baker", "my grandmother", "the sous-chef", "the home cook", "the pastry chef",
                   "our neighbour", "the cooking teacher", "the caterer", "my uncle"],
        "things": ["the sauce", "the sourdough", "the risotto", "the pastry", "the soup", "the marinade",
                   "the roast chicken", "the curry", "the pancakes", "the apple pie", "the dumplings",
                   "the salad dressing"],
        "actions": ["seasoned", "prepared", "served", "tasted", "finished", "chopped the onions for",
                    "improved the recipe for"],
        "places": ["in the kitchen", "at the market", "by the oven", "at the bakery", "at the stove"],
    },
    "politics": {
        "agents": ["the senator", "the mayor", "the minister", "the committee", "the governor", "the opposition leader",
                   "the prime minister", "the city council", "the party spokesperson", "the ambassador"],
        "things": ["the budget", "the election", "the new bill", "the tax reform", "the coalition", "the referendum",
                   "the parliament vote", "the trade agreement", "the campaign", "the constitution",
                   "the polling results", "the cabinet reshuffle"],
        "actions": ["spoke about", "debated", "campaigned for", "questioned", "defended", "commented on",
                    "criticised"],
        "places": ["in parliament", "at the town hall", "at the press conference", "in the senate",
                   "at the party congress"],
    },
}
SHARED_VERBS = ["talked about", "prepared for", "reviewed", "described", "worried about", "spent the morning on",
                "explained", "got excited about", "wrote a note about", "asked questions about"]
WHEN = ["on Monday", "last week", "after lunch", "in the evening", "this morning", "yesterday", "on Friday night",
        "before the holidays"]
PREDICATES = ["will change everything", "was a surprise", "needs more time", "went better than planned",
              "is the main story this week", "caused a long discussion", "was hard to follow", "looks promising"]

TOPIC_TAILS = ["Everyone had an opinion about it.", "It was all over the news the next day.",
               "My cousin sent me a message about it.", "We talked about it on the way home.",
               "Nobody could have predicted how it went.", "I will remember that day for a long time."]


def _topic(rng: random.Random, label: str) -> str:
    t = TOPICS[label]
    agent, thing, place = rng.choice(t["agents"]), rng.choice(t["things"]), rng.choice(t["places"])
    when = rng.choice(WHEN)
    templates = [
        lambda: f"{agent} {rng.choice(SHARED_VERBS)} {thing} {when}.",
        lambda: f"{when}, {agent} {rng.choice(t['actions'])} {thing}.",
        lambda: f"According to {agent}, {thing} {rng.choice(PREDICATES)}.",
        lambda: f"We read a long article about {thing} {place}.",
        lambda: f"{agent} {rng.choice(t['actions'])} {thing} {place} {when}.",
        lambda: f"Nobody {place} was surprised by {thing}.",
        lambda: f"My friend and {agent} {rng.choice(SHARED_VERBS)} {thing} for an hour.",
    ]
    text = _cap(rng.choice(templates)())
    if rng.random() < 0.4:  # a topic-free second sentence: longer examples, same label
        text += " " + rng.choice(TOPIC_TAILS)
    return text


# --- language: the same sentence frames in English, French, German and Spanish --------------------------------
# Subjects: (text, person) with person 0 = 1st singular, 1 = 3rd singular, 2 = 1st plural, 3 = 3rd plural.
LANG_SUBJECTS = {
    "en": [("I", 0), ("Anna", 1), ("my brother", 1), ("the teacher", 1), ("we", 2), ("my parents", 3),
           ("the children", 3), ("our neighbours", 3)],
    "fr": [("je", 0), ("Anna", 1), ("mon frère", 1), ("le professeur", 1), ("nous", 2), ("mes parents", 3),
           ("les enfants", 3), ("nos voisins", 3)],
    "de": [("ich", 0), ("Anna", 1), ("mein Bruder", 1), ("der Lehrer", 1), ("wir", 2), ("meine Eltern", 3),
           ("die Kinder", 3), ("unsere Nachbarn", 3)],
    "es": [("", 0), ("Anna", 1), ("mi hermano", 1), ("el profesor", 1), ("", 2), ("mis padres", 3),
           ("los niños", 3), ("nuestros vecinos", 3)],  # Spanish drops the pronouns yo / nosotros
}
# Verbs: English, French, German, Spanish forms for persons 0-3, and the object kinds they take.
LANG_VERBS = [
    ({"en": ["eat", "eats", "eat", "eat"], "fr": ["mange", "mange", "mangeons", "mangent"],
      "de": ["esse", "isst", "essen", "essen"], "es": ["como", "come", "comemos", "comen"]}, ("food",)),
    ({"en": ["buy", "buys", "buy", "buy"], "fr": ["achète", "achète", "achetons", "achètent"],
      "de": ["kaufe", "kauft", "kaufen", "kaufen"], "es": ["compro", "compra", "compramos", "compran"]},
     ("food", "thing", "text")),
    ({"en": ["read", "reads", "read", "read"], "fr": ["lis", "lit", "lisons", "lisent"],
      "de": ["lese", "liest", "lesen", "lesen"], "es": ["leo", "lee", "leemos", "leen"]}, ("text",)),
    ({"en": ["write", "writes", "write", "write"], "fr": ["écris", "écrit", "écrivons", "écrivent"],
      "de": ["schreibe", "schreibt", "schreiben", "schreiben"],
      "es": ["escribo", "escribe", "escribimos", "escriben"]}, ("writable",)),
    ({"en": ["see", "sees", "see", "see"], "fr": ["vois", "voit", "voyons", "voient"],
      "de": ["sehe", "sieht", "sehen", "sehen"], "es": ["veo", "ve", "vemos", "ven"]}, ("thing",)),
    ({"en": ["cook", "cooks", "cook", "cook"], "fr": ["prépare", "prépare", "préparons", "préparent"],
      "de": ["koche", "kocht", "kochen", "kochen"], "es": ["preparo", "prepara", "preparamos", "preparan"]},
     ("dish",)),
    ({"en": ["want", "wants", "want", "want"], "fr": ["veux", "veut", "voulons", "veulent"],
      "de": ["will", "will", "wollen", "wollen"], "es": ["quiero", "quiere", "queremos", "quieren"]},
     ("food", "thing")),
]
# Objects (German in the accusative), by kind.
LANG_OBJECTS = {
    "food": [("the bread", "le pain", "das Brot", "el pan"), ("an apple", "une pomme", "einen Apfel", "una manzana"),
             ("the cake", "le gâteau", "den Kuchen", "el pastel"), ("cheese", "du fromage", "Käse", "queso"),
             ("a salad", "une salade", "einen Salat", "una ensalada"), ("the fish", "le poisson", "den Fisch", "el pescado")],
    "dish": [("the soup", "la soupe", "die Suppe", "la sopa"), ("the fish", "le poisson", "den Fisch", "el pescado"),
             ("rice", "du riz", "Reis", "arroz"), ("the vegetables", "les légumes", "das Gemüse", "las verduras")],
    "thing": [("a car", "une voiture", "ein Auto", "un coche"), ("the house", "la maison", "das Haus", "la casa"),
              ("a new bicycle", "un nouveau vélo", "ein neues Fahrrad", "una bicicleta nueva"),
              ("the train", "le train", "den Zug", "el tren"),
              ("a red jacket", "une veste rouge", "eine rote Jacke", "una chaqueta roja"),
              ("the blue chair", "la chaise bleue", "den blauen Stuhl", "la silla azul")],
    "text": [("a book", "un livre", "ein Buch", "un libro"), ("the newspaper", "le journal", "die Zeitung", "el periódico"),
             ("a letter", "une lettre", "einen Brief", "una carta"), ("the report", "le rapport", "den Bericht", "el informe")],
    "writable": [("a letter", "une lettre", "einen Brief", "una carta"), ("the message", "le message", "die Nachricht", "el mensaje"),
                 ("a story", "une histoire", "eine Geschichte", "una historia"), ("the report", "le rapport", "den Bericht", "el informe"),
                 ("a long email", "un long e-mail", "eine lange E-Mail", "un correo largo")],
}
LANG_ADVERBIALS = [("today", "aujourd'hui", "heute", "hoy"), ("every morning", "chaque matin", "jeden Morgen", "cada mañana"),
                   ("at home", "à la maison", "zu Hause", "en casa"), ("in the evening", "le soir", "am Abend", "por la tarde"),
                   ("on Sunday", "le dimanche", "am Sonntag", "el domingo"),
                   ("with my friends", "avec mes amis", "mit meinen Freunden", "con mis amigos"),
                   ("after work", "après le travail", "nach der Arbeit", "después del trabajo"),
                   ("in the kitchen", "dans la cuisine", "in der Küche", "en la cocina")]
# Predicative frame: nouns (en, fr with gender, de with gender, es with gender) and adjectives.
LANG_NOUNS = [("house", ("maison", "f"), ("Haus", "n"), ("casa", "f")), ("car", ("voiture", "f"), ("Auto", "n"), ("coche", "m")),
              ("garden", ("jardin", "m"), ("Garten", "m"), ("jardín", "m")), ("city", ("ville", "f"), ("Stadt", "f"), ("ciudad", "f")),
              ("room", ("chambre", "f"), ("Zimmer", "n"), ("habitación", "f")), ("book", ("livre", "m"), ("Buch", "n"), ("libro", "m")),
              ("street", ("rue", "f"), ("Straße", "f"), ("calle", "f")), ("school", ("école", "f"), ("Schule", "f"), ("escuela", "f")),
              ("kitchen", ("cuisine", "f"), ("Küche", "f"), ("cocina", "f")), ("hotel", ("hôtel", "m"), ("Hotel", "n"), ("hotel", "m"))]
LANG_ADJECTIVES = [("big", ("grand", "grande"), "groß", ("grande", "grande")), ("small", ("petit", "petite"), "klein", ("pequeño", "pequeña")),
                   ("new", ("neuf", "neuve"), "neu", ("nuevo", "nueva")), ("old", ("vieux", "vieille"), "alt", ("viejo", "vieja")),
                   ("beautiful", ("beau", "belle"), "schön", ("bonito", "bonita")), ("expensive", ("cher", "chère"), "teuer", ("caro", "cara")),
                   ("quiet", ("calme", "calme"), "ruhig", ("tranquilo", "tranquila")), ("clean", ("propre", "propre"), "sauber", ("limpio", "limpia")),
                   ("cold", ("froid", "froide"), "kalt", ("frío", "fría")), ("modern", ("moderne", "moderne"), "modern", ("moderno", "moderna"))]
LANG_INDEX = {"en": 0, "fr": 1, "de": 2, "es": 3}


def _french_subject_verb(subject: str, verb: str) -> str:
    if subject == "je" and verb[0] in "aeiouéèh":
        return "j'" + verb
    return f"{subject} {verb}"


def _svo(rng: random.Random, lang: str) -> str:
    subject, person = rng.choice(LANG_SUBJECTS[lang])
    forms, kinds = rng.choice(LANG_VERBS)
    obj = rng.choice(LANG_OBJECTS[rng.choice(kinds)])[LANG_INDEX[lang]]
    adverbial = rng.choice(LANG_ADVERBIALS)[LANG_INDEX[lang]]
    verb = forms[lang][person]
    if lang == "fr":
        head = _french_subject_verb(subject, verb)
    else:
        head = f"{subject} {verb}".strip()
    if lang == "de":  # German puts the time or place before a plain object: Ich esse heute einen Apfel.
        return _cap(f"{head} {adverbial} {obj}.")
    return _cap(f"{head} {obj} {adverbial}.")


def _predicative(rng: random.Random, lang: str) -> str:
    en, (fr, fr_g), (de, de_g), (es, es_g) = rng.choice(LANG_NOUNS)
    (a_en, a_fr, a_de, a_es), (b_en, b_fr, b_de, b_es) = rng.sample(LANG_ADJECTIVES, 2)
    very = rng.random() < 0.4
    ours = rng.random() < 0.4
    if lang == "en":
        det = "our" if ours else "the"
        return _cap(f"{det} {en} is {'very ' if very else ''}{a_en} but {b_en}.")
    if lang == "fr":
        g = 0 if fr_g == "m" else 1
        det = "notre " if ours else ("l'" if fr[0] in "aeiouéh" else ("le " if g == 0 else "la "))
        return _cap(f"{det}{fr} est {'très ' if very else ''}{a_fr[g]} mais {b_fr[g]}.")
    if lang == "de":
        det = ({"m": "unser", "f": "unsere", "n": "unser"} if ours else {"m": "der", "f": "die", "n": "das"})[de_g]
        return _cap(f"{det} {de} ist {'sehr ' if very else ''}{a_de}, aber {b_de}.")
    g = 0 if es_g == "m" else 1
    det = ("nuestro" if g == 0 else "nuestra") if ours else ("el" if g == 0 else "la")
    return _cap(f"{det} {es} es {'muy ' if very else ''}{a_es[g]} pero {b_es[g]}.")


def _language(rng: random.Random, label: str) -> str:
    first = _svo(rng, label) if rng.random() < 0.65 else _predicative(rng, label)
    if rng.random() < 0.5:  # a second sentence now and then, for length
        return f"{first} {_predicative(rng, label) if rng.random() < 0.5 else _svo(rng, label)}"
    return first


# --- code vs prose: snippets in five languages vs English sentences, half of them about programs ---------------
NAMES = ["count", "total", "items", "user_name", "price", "index", "result", "values", "data", "name", "scores",
         "orders", "limit", "offset", "buffer", "line", "words", "row", "config", "path"]
FUNCS = ["add", "scale", "merge", "parse_line", "load_data", "compute_total", "find_user", "check_limit", "clean",
         "to_upper", "average", "update_price"]
TABLES = ["users", "orders", "products", "events", "invoices", "customers"]
OPS = ["+", "-", "*", "/", "%"]
EXTS = ["txt", "log", "csv", "py", "json"]
DIRS = ["backup", "build", "logs", "tmp/out", "data/raw"]


def _code(rng: random.Random) -> str:
    a, b, c = rng.sample(NAMES, 3)
    f, n, m = rng.choice(FUNCS), rng.randint(0, 99), rng.randint(1, 500)
    op, table, ext, folder = rng.choice(OPS), rng.choice(TABLES), rng.choice(EXTS), rng.choice(DIRS)
    col1, col2 = rng.sample(["id", "name", "price", "created_at", "status", "email", "amount"], 2)
    snippets = [  # (comment mark, snippet)
        ("#", f"def {f}({a}, {b}):\n    return {a} {op} {b}"),
        ("#", f"for {a} in {b}:\n    {c} += {a}"),
        ("#", f"if {a} > {n}:\n    print({a})\nelse:\n    {b} = None"),
        ("#", f"{a} = [{b} * {n} for {b} in range({m})]"),
        ("#", f"with open('{c}.{ext}') as fh:\n    {a} = fh.read().splitlines()"),
        ("#", f"{a} = {{'{b}': {n}, '{c}': {m}}}"),
        ("//", f"const {f} = ({a}, {b}) => {a} {op} {b};"),
        ("//", f"for (let i = 0; i < {a}.length; i++) {{\n  {b} += {a}[i];\n}}"),
        ("//", f"if ({a} === null) {{\n  return {n};\n}}"),
        ("//", f"document.getElementById('{b}').textContent = {a};"),
        ("//", f"int {f}(int {a}, int {b}) {{\n    return {a} {op} {b};\n}}"),
        ("//", f"for (int i = 0; i < {m}; i++) {{\n    {a}[i] = {n};\n}}"),
        ("//", f"printf(\"%d\\n\", {a});"),
        ("--", f"SELECT {col1}, {col2} FROM {table} WHERE {col1} > {n};"),
        ("--", f"UPDATE {table} SET {col1} = {n} WHERE id = {m};"),
        ("--", f"INSERT INTO {table} ({col1}, {col2}) VALUES ({n}, '{a}');"),
        ("#", f"grep -rn '{a}' {folder} | wc -l"),
        ("#", f"for f in *.{ext}; do cp \"$f\" {folder}/; done"),
        ("#", f"mkdir -p {folder} && cd {folder}"),
    ]
    mark, snippet = rng.choice(snippets)
    if rng.random() < 0.3:  # an English comment in the snippet's own syntax: prose words inside code
        snippet = f"{mark} {rng.choice(COMMENTS)}\n{snippet}"
    return snippet


COMMENTS = ["add the price to the total", "skip the empty lines", "the total is in cents", "only the active users",
            "keep the first match", "this runs once a day", "check the limit before saving", "copy the files we need"]
PERSONS = ["Maria", "the new developer", "my colleague", "our team lead", "the intern", "Tom", "the reviewer",
           "the student", "my neighbour", "the librarian"]
PROSE_ABOUT_CODE = [
    "{p} wrote a function that adds the two numbers and returns their total.",
    "The loop goes over each item in the list of {t} and adds its price to the total.",
    "If the value is missing, the program prints a warning and stops.",
    "We store every order in a table called {t}, one row per customer.",
    "{p} spent the afternoon looking for the bug in the login page.",
    "The script copies the log files into the backup folder every night.",
    "Before the release, {p} checked that every test still passed.",
    "The query returns the name and email of each customer who paid more than {n} euros.",
    "{p} explained that the index starts at zero, not at one.",
    "Our build takes about {n} minutes because it compiles everything twice.",
    "{p} renamed the variable so that the code would be easier to read.",
    "The program reads the file line by line and counts the words in each line.",
]
PROSE_GENERAL = [
    "{p} walks the dog along the river every evening.",
    "We spent the weekend painting the kitchen a pale shade of green.",
    "{p} borrowed three novels from the library and finished one on the train.",
    "The bakery on our street sells fresh bread until {h} o'clock.",
    "It rained all morning, so the football match was moved to Sunday.",
    "{p} forgot the umbrella at the station and came home soaking wet.",
    "The museum was quiet, and we had the old maps almost to ourselves.",
    "After dinner, {p} told us a long story about a summer in the mountains.",
    "The garden is full of tomatoes this year, more than we can eat.",
    "{p} is learning to play the piano and practises for {n} minutes a day.",
    "The bus was late again, so we walked the last two kilometres.",
    "Our neighbours invited everyone on the street to a picnic in the park.",
]


def _prose_sentence(rng: random.Random, templates: list[str]) -> str:
    return _cap(rng.choice(templates).format(p=rng.choice(PERSONS), t=rng.choice(TABLES), n=rng.randint(2, 60),
                                             h=rng.randint(4, 9)))


def _prose(rng: random.Random) -> str:
    text = _prose_sentence(rng, PROSE_ABOUT_CODE if rng.random() < 0.5 else PROSE_GENERAL)
    if rng.random() < 0.4:  # a second sentence: longer examples, and pairs not seen as a whole
        text += " " + _prose_sentence(rng, PROSE_ABOUT_CODE + PROSE_GENERAL)
    return text


def _code_or_prose(rng: random.Random, label: str) -> str:
    return _code(rng) if label == "code" else _prose(rng)


# --- building and writing ------------------------------------------------------------------------------------
TASKS: dict[str, tuple[tuple[str, ...], Callable[[random.Random, str], str], int]] = {
    # name: (classes, generator, seed)
    "sentiment": (("negative", "positive"), _sentiment, 1),
    "topic": (("cooking", "politics", "science", "sports"), _topic, 2),
    "language": (("de", "en", "es", "fr"), _language, 3),
    "code": (("code", "prose"), _code_or_prose, 4),
}


def build_task(name: str, n: int = PER_TASK) -> list[dict]:
    """The task's examples: n // len(classes) unique texts per class, shuffled, as {"text", "label"} rows."""
    classes, generate, seed = TASKS[name]
    rng = random.Random(seed)
    per_class = n // len(classes)
    seen: set[str] = set()
    rows: list[dict] = []
    for label in classes:
        made, tries = 0, 0
        while made < per_class:
            tries += 1
            if tries > 200 * per_class:
                raise RuntimeError(f"{name}/{label}: the templates give fewer than {per_class} distinct texts")
            text = generate(rng, label)
            if text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": label})
            made += 1
    rng.shuffle(rows)
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write <task>.jsonl into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in TASKS:
        text = render(build_task(name))
        (args.out / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{name}: {text.count(chr(10))} examples, {len(text.encode('utf-8'))} bytes")


if __name__ == "__main__":
    main()
