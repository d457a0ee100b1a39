"""Scope in a customer-service deployment: is a message covered by the FAQ, the business's but not covered,
small talk, or outside the business? And the fixed replies for the last three (no model involved).

The classifier is a small multinomial logistic model over scores the FAQ index already computes (the
fused match score, its margin and word gap, the best plain similarity to any FAQ phrasing, and the best
similarity to generic business, chat and small-talk prototypes), fitted by `rapport bench faq --calibrate` on
the dev split of `bench/data/faq_bank_*`. Small talk is answered in kind from the nearest prototype's kind.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

SCOPES = ("covered", "unknown", "smalltalk", "outside")
FEATURES = ("score", "margin", "gap", "faq_best", "business", "chat", "smalltalk")

# Short social messages, by kind; a message nearest one of these (and short) is small talk.
SMALL_TALK = {
    "greeting": ("hi", "hello", "hey there", "good morning", "good afternoon", "good evening", "hiya, hope you're well"),
    "how_are_you": ("how are you?", "how's it going?", "how are you doing today?", "you alright?"),
    "thanks": ("thanks", "thank you very much", "cheers", "thanks, that helped", "much appreciated"),
    "goodbye": ("bye", "goodbye", "see you", "have a nice day", "that's all, thanks, bye", "good night"),
    "identity": ("are you a human?", "are you a bot?", "who are you?", "what's your name?", "what can you do?",
                 "who am I talking to?"),
    "ack": ("ok", "okay great", "nice", "cool", "lol", "haha", "awesome", "perfect", "got it", "sorry, never mind"),
}
SMALL_TALK_WORDS = 10  # longer messages carry a request, even when they open with a greeting

SMALL_TALK_REPLIES = {
    "greeting": "Hello! How can I help you today? I can answer questions about {topics}.",
    "how_are_you": "I'm doing well, thank you for asking! What can I help you with today?",
    "thanks": "You're welcome! Is there anything else I can help you with?",
    "goodbye": "Goodbye, and thank you for getting in touch!",
    "identity": "I'm an automated assistant. I can answer questions about {topics}, and I can connect you with "
                "a colleague whenever you like.",
    "ack": "Great! Is there anything else I can help you with?",
}
OUTSIDE_REPLY = ("Sorry, that's not something I can help with here. I can answer questions about {topics}. "
                 "If you'd like to talk to a person, just say so and I'll connect you with a colleague.")
NO_TOPICS = "this business's products and services"


def topics_of(tag_lists: list[list[str]], questions: list[str], limit: int = 5) -> str:
    """What the FAQ covers, in words: its most common tags ("cards, fees, top-ups and transfers")."""
    counts = Counter(tag for tags in tag_lists for tag in tags)
    names = [tag.replace("-", " ") for tag, _ in counts.most_common(limit)]
    if not names:
        return NO_TOPICS if not questions else "things like: " + "; ".join(q.rstrip("?") for q in questions[:3])
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@dataclass(frozen=True)
class ScopeModel:
    """P(scope | features) = softmax(bias + weights · features); `answer_from` gates verbatim answers."""

    bias: tuple[float, ...]  # one per scope
    weights: tuple[tuple[float, ...], ...]  # (scopes, features)
    answer_from: float = 0.8  # P(covered) at or above this, with the margin, answers with the entry's text
    answer_margin: float = 0.05
    covered_from: float = 0.0  # below this P(covered), a message the model calls covered is not covered

    def probabilities(self, features: tuple[float, ...]) -> list[float]:
        logits = [b + sum(w * f for w, f in zip(row, features)) for b, row in zip(self.bias, self.weights)]
        top = max(logits)
        exps = [math.exp(z - top) for z in logits]
        total = sum(exps)
        return [e / total for e in exps]

    def scope(self, features: tuple[float, ...]) -> tuple[str, float]:
        """(the most probable scope, P(covered))."""
        p = self.probabilities(features)
        best = max(range(len(SCOPES)), key=p.__getitem__)
        if SCOPES[best] == "covered" and p[0] < self.covered_from:
            best = max(range(1, len(SCOPES)), key=p.__getitem__)
        return SCOPES[best], p[0]


def fit_scope_model(rows: list[tuple[tuple[float, ...], str]], l2: float = 0.01, steps: int = 3000,
                    lr: float = 0.5) -> ScopeModel:
    """Multinomial logistic regression by gradient descent on (features, scope) rows; features standardised
    for the fit and folded back into the weights."""
    import numpy as np

    x = np.array([f for f, _ in rows], dtype=np.float64)
    y = np.array([SCOPES.index(s) for _, s in rows])
    mean, std = x.mean(0), x.std(0) + 1e-9
    xs = (x - mean) / std
    onehot = np.eye(len(SCOPES))[y]
    w = np.zeros((len(SCOPES), x.shape[1]))
    b = np.zeros(len(SCOPES))
    for _ in range(steps):
        logits = xs @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * (grad.T @ xs + l2 * w)
        b -= lr * grad.sum(0)
    weights = w / std  # (S, F) on raw features
    bias = b - weights @ mean
    return ScopeModel(tuple(round(float(v), 4) for v in bias), tuple(tuple(round(float(v), 4) for v in row)
                                                                      for row in weights))
