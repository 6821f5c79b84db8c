"""What the model asks itself: concepts (a topics file or the corpus's frequent content words
and phrases) put into the seed's question templates, Spanish or English, by age.

THAU's templates (seed 004): from age 0 "¿Qué es {concept}?" and "¿Cómo se usa {concept}?";
from age 3 also relations between two concepts and a concept's advantages.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from semilla.errors import ConfigError

# age -> templates added from that age on
TEMPLATES: dict[str, dict[int, list[str]]] = {
    "es": {
        0: ["¿Qué es {concept}?", "¿Cómo se usa {concept}?"],
        3: ["¿Cómo se relaciona {concept1} con {concept2}?", "¿Cuáles son las ventajas de {concept}?"],
    },
    "en": {
        0: ["What is {concept}?", "How is {concept} used?"],
        3: ["How does {concept1} relate to {concept2}?", "What are the advantages of {concept}?"],
    },
}


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


STOPWORDS = {
    "es": _word_set(
        "a al algo algunos ante antes aquel aquella así aun aunque bien cada como con contra cual cuando "
        "de del desde donde dos el ella ellas ello ellos en entre era eran es esa ese eso esta este esto "
        "estos fue fueron ha habia había han hasta hay la las le les lo los mas más me mi mientras mis "
        "mucho muy nada ni no nos nuestro o otra otro otros para pero poco por porque pues que qué quien "
        "se sea según ser si sí sin sino sobre son su sus tal también tan tanto te tenía tiene todo todos "
        "tu tus un una uno unos vos vuestra y ya yo dijo señor merced vuestra dice decir cosa cosas"
    ),
    "en": _word_set(
        "a about after all also an and any are as at be been but by can could did do does for from had "
        "has have he her here him his how i if in into is it its just like me more most my no not now of "
        "on one only or other our out said she so some such than that the their them then there these "
        "they this those to too up upon us very was we were what when where which while who will with "
        "would you your"
    ),
}

WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """Lower-case words of letters only (accents kept)."""
    return WORD.findall(text.lower())


def detect_language(text: str) -> str:
    """'es' or 'en': whichever language's common words the text holds more of."""
    counts = Counter(words(text))
    score = {lang: sum(counts[w] for w in stop) for lang, stop in STOPWORDS.items()}
    return "es" if score["es"] >= score["en"] else "en"


def corpus_concepts(text: str, language: str, n: int) -> list[str]:
    """The `n` most frequent content words and two-word phrases of a corpus: words of 4+ letters
    that are not common words; a phrase counts when it occurs at least 3 times."""
    stop = STOPWORDS[language]
    tokens = words(text)
    content = [w if len(w) >= 4 and w not in stop else None for w in tokens]
    counts: Counter[str] = Counter(w for w in content if w)
    phrases = Counter(f"{a} {b}" for a, b in zip(content, content[1:], strict=False) if a and b)
    counts.update({p: c for p, c in phrases.items() if c >= 3})
    return [w for w, _ in counts.most_common(n)]


def read_lines(path: str, what: str) -> list[str]:
    """The non-empty, non-comment lines of a user's file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{what} file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ConfigError(f"{what} file {path} is empty")
    return lines


def templates_for(language: str, age: int, path: str = "") -> list[str]:
    """The templates of `language` up to `age`, or the user's file (which replaces them)."""
    if path:
        found = read_lines(path, "templates")
        bad = [t for t in found if not re.search(r"\{concept[12]?\}", t)]
        if bad:
            raise ConfigError(f"templates file {path}: {bad[0]!r} has no {{concept}} placeholder")
        return found
    return [t for since, group in TEMPLATES[language].items() if age >= since for t in group]


def make_questions(concepts: list[str], templates: list[str]) -> list[dict[str, str]]:
    """Every template filled with every concept, concept by concept (a relation template pairs a
    concept with the next one): [{"concept", "question"}, ...], without repeats."""
    questions, seen = [], set()
    for i, concept in enumerate(concepts):
        other = concepts[(i + 1) % len(concepts)]
        for template in templates:
            if "{concept1}" in template and other == concept:
                continue
            text = template.format(concept=concept, concept1=concept, concept2=other)
            if text not in seen:
                seen.add(text)
                questions.append({"concept": concept, "question": text})
    return questions
