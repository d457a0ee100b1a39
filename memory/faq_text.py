"""Text helpers for the FAQ: content words, the facts a reply states, the fixed replies, message-kind prototypes."""

from __future__ import annotations

import re

UNKNOWN_REPLY = "I don't know that one, I'm afraid. Shall I connect you with a colleague who can help?"

# Function words that carry no topic: left out of BM25 and of the "which words does the entry cover" check.
STOPWORDS = frozenset("""
a about above after again all also am an and any anyone anything are as at be because been before being
below between both but by can could did do does doing done don down during each either else ever every few
for from further get gets getting got had has have having he her here hers herself him himself his how i
if in into is it its itself just let like ll me might mine more most much must my myself need no nor not
now of off on once one only or other our ours ourselves out over own please re really s same shall she
should so some someone something still such t than that the their theirs them themselves then there these
they this those through to too under until up us ve very want was way we were what whats when where which
while who whom why will with would yes yet you your yours yourself yourselves d m im id ive youre hi hello
thanks thank ok okay dont cant doesnt isnt wont didnt arent
""".split())

WORD = re.compile(r"[^\W_]+")


def stem(word: str) -> str:
    """A light English suffix stripper: enough to meet `bikes`/`bike` and `opening`/`open`."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ed"):
        return word[:-2]
    return word


def content_words(text: str) -> list[str]:
    """Stemmed topic words of `text`, in order, repeats kept (BM25 counts them)."""
    words = WORD.findall(text.lower().replace("'", ""))
    return [stem(w) for w in words if w not in STOPWORDS and (len(w) > 1 or w.isdigit())]


# -- is a message about the business at all? ---------------------------------------------------------------
# Generic prototypes of the two kinds of message that do not hit the FAQ: a customer asking the business for
# something (→ "unknown": say so, offer a human) and ordinary conversation (→ "none": chat as usual). They
# are domain-free; the FAQ's own questions join the business side at run time.
BUSINESS_PROTOTYPES = (
    "How much does it cost?", "What is the price of this product?", "Do you sell this item?",
    "Do you offer this service?", "Can I book an appointment?", "What is your phone number?",
    "Where is your store located?", "Do you have another branch in a different city?", "Are you open today?",
    "Do you deliver to my address?", "Can I get a refund?", "Is there a discount for me?",
    "Do you have it in stock?", "Who is the manager of the shop?", "Can I speak to someone from your team?",
    "Which payment methods do you accept?", "Do you repair this kind of thing?", "Can I rent equipment from you?",
    "Do you have a sale on at the moment?", "How can I contact your company?", "Do you run events or courses?",
    "Is your company on social media?", "Can you fit or install this for me?", "What are your terms and conditions?",
)
CHAT_PROTOTYPES = (
    "Hello!", "Hey, good evening.", "How is it going?", "Thank you so much!", "Goodbye, talk soon.",
    "Tell me a funny story.", "What is my name?", "Do you remember what I told you?", "What do you know about me?",
    "My name is Sam.", "I live in Berlin.", "I work as a teacher.", "I have two cats.", "I am allergic to nuts.",
    "Please answer in fewer words.", "Call me by my first name.", "I had a long day.", "I am so happy today!",
    "What is the capital of Canada?", "How many planets are in the solar system?", "Who painted the Mona Lisa?",
    "Write a short poem about the sea.", "Summarise this article for me.", "Help me draft a message to a friend.",
    "What is 12 plus 30?", "Translate this sentence into Spanish.", "Are you human?", "What can you do?",
    "What is your favourite film?", "What do you think about football?", "Will it rain this weekend?",
    "What happened in the news today?", "Give me a recipe for pancakes.", "haha", "nice", "I see.",
)


# -- facts a reply states, for grounding checks ------------------------------------------------------------
EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w-]+(?:\.[\w-]+)*\.(?:com|org|net|example|co\.uk|io|shop)(?:/\S*)?\b",
                 re.IGNORECASE)
PHONE = re.compile(r"(?<![\w£$€])\+?\d[\d ()\-]{5,}\d(?![\w%])")
MONEY = re.compile(r"[£$€]\s?\d(?:[\d,]*\d)?(?:\.\d+)?|\b\d(?:[\d,]*\d)?(?:\.\d+)?\s?(?:pounds?|euros?|dollars?|pence|p\b|gbp|eur|usd)",
                   re.IGNORECASE)
TIME = re.compile(r"\b(\d{1,2})(?:[:.](\d{2}))?\s?(am|pm|a\.m\.|p\.m\.)|\b(\d{1,2})[:.](\d{2})\b", re.IGNORECASE)
MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|december|"
          "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
DATE = re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{MONTHS})\b|\b(?:{MONTHS})\s+\d{{1,2}}(?:st|nd|rd|th)?\b|"
                  r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}/\d{1,2}(?:/\d{2,4})?\b", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?%?")
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "ninety": "90", "hundred": "100"})
for _word in ("zero", "one"):  # "one of our…", "which one": too common to be a stated fact
    del NUMBER_WORDS[_word]


def number_value(text: str) -> str:
    """`£1,800.00` → `1800`; `10%` → `10`."""
    digits = re.sub(r"[^\d.]", "", text.replace(",", "")).strip(".")
    if "." in digits:
        digits = digits.rstrip("0").rstrip(".")
    return digits.lstrip("0") or "0"


def clock(hour: str, minute: str | None, half: str | None) -> str:
    h, m = int(hour), int(minute or 0)
    if half and half.lower().startswith("p") and h < 12:
        h += 12
    if half and half.lower().startswith("a") and h == 12:
        h = 0
    return f"{h}:{m:02d}"


def date_parts(text: str) -> list[str]:
    """`1st of January` → ["1", "jan"]; `2026-01-01` → ["2026", "1", "1"]."""
    parts = []
    for token in re.findall(r"\d+|[a-z]+", text.lower()):
        if token.isdigit():
            parts.append(token.lstrip("0") or "0")
        elif re.fullmatch(MONTHS, token):
            parts.append(token[:3])
    return parts


def stated_facts(text: str) -> list[tuple[str, str]]:
    """(as written, canonical key) for each email, URL, phone number, price, time, date and number in `text`."""
    facts: list[tuple[str, str]] = []
    taken: list[tuple[int, int]] = []

    def free(span: tuple[int, int]) -> bool:
        return all(span[1] <= a or span[0] >= b for a, b in taken)

    def add(match: re.Match, key: str) -> None:
        if free(match.span()):
            taken.append(match.span())
            facts.append((match.group(0).strip(), key))

    for match in EMAIL.finditer(text):
        add(match, "email:" + match.group(0).lower())
    for match in URL.finditer(text):
        add(match, "url:" + re.sub(r"^(https?://)?(www\.)?", "", match.group(0).lower()).rstrip("/.,"))
    for match in PHONE.finditer(text):
        digits = re.sub(r"\D", "", match.group(0))
        if len(digits) >= 7 and not DATE.fullmatch(match.group(0).strip()):
            add(match, "phone:" + digits[-9:])
    for match in MONEY.finditer(text):
        add(match, "num:" + number_value(match.group(0)))
    for match in TIME.finditer(text):
        if match.group(3):
            add(match, "time:" + clock(match.group(1), match.group(2), match.group(3)))
        else:
            add(match, "time:" + clock(match.group(4), match.group(5), None))
    for match in DATE.finditer(text):
        add(match, "date:" + " ".join(sorted(date_parts(match.group(0)))))
    for match in NUMBER.finditer(text):
        add(match, "num:" + number_value(match.group(0)))
    for word in re.finditer(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", text, re.IGNORECASE):
        add(word, "num:" + NUMBER_WORDS[word.group(0).lower()])
    return facts


def fact_keys(text: str) -> set[str]:
    """Canonical keys of the facts in `text`, plus every bare number inside them (a time's hour, a date's day)."""
    keys = set()
    for _, key in stated_facts(text):
        keys.add(key)
        keys.update("num:" + n.lstrip("0") if n.strip("0") else "num:0" for n in re.findall(r"\d+", key.split(":", 1)[1]))
    return keys
