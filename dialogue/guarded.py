"""A generation that passes the degeneration guard: held back until its first words are checked, generated
once more (avoiding the copied words) when they fail, then replaced by a short honest reply. Never loops.

After the opening, the reply streams a sentence at a time, each sentence checked before it is shown: a
sentence that echoes, repeats or takes the user's life as the bot's own ends the reply there (what was shown
passed every check). The fallback tells a statement back in the second person ("Noted: you live in Porto.")
and is never the same words as an earlier reply.

Outcomes recorded on the turn (`Turn.guard`): None (clean), "<kind>:regenerated" (the second try passed),
"<kind>:fallback" (both failed; the fixed reply was shown), "cut:<kind>" (a later sentence failed; the reply
ends before it), "late:<kind>" (the whole text failed its check after it was shown: `text()` callers only),
"empty" (a blank reply, not retried: each channel has its own answer to one, Chatwoot hands over to a person;
kept in the history as before). Fallback and late replies are left out of later prompts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from dialogue.guard import FIRST, SECOND, SENTENCE, WORD, Verdict, check_reply, repeat, words
from dialogue.model.worker import COPY_RUN, AdapterRef, GenerationParams
from dialogue.store import UNANSWERED
from memory.facts import memory_text
from memory.personal import second_person

logger = logging.getLogger(__name__)

HOLD_WORDS = 16  # words held back before streaming starts: echoes and repeats show in the opening
HOLD_CHUNKS = 24  # and at most this many deltas (a reply of blank lines has no words to wait for)
RETRY_TEMPERATURE = 0.7  # a greedy or cool first try would only say the same again
RETRY_REPETITION_PENALTY = 1.3
FLUSH_WORDS = 40  # a sentence that runs on this long is checked and shown without waiting for its end
FALLBACK_STATEMENT = "Thanks, I'll remember that."  # honest: a statement is kept in memory (memory.facts)
FALLBACK_OTHER = "Sorry, I don't have a good answer to that. Could you put it another way?"
# further wordings, so that a fallback never repeats an earlier reply of the conversation
FALLBACKS_STATEMENT = (FALLBACK_STATEMENT, "Got it, I'll keep that in mind.", "Thank you for telling me.")
FALLBACKS_OTHER = (FALLBACK_OTHER, "I'm not sure how to answer that well. Could you tell me a bit more?",
                   "I don't have a good answer to that one, sorry.")
TOLD_BACK_WORDS = 16  # a statement longer than this is not told back in the fallback
OWN_STATEMENT = re.compile(r"^(?:i|i'm|i've|my|we|we're|our)\b", re.I)
BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+|\n+")
COMMON = frozenset("the a an to of and in is it that this for on with".split())


@dataclass(frozen=True)
class GuardInputs:
    """What a reply is checked against: the user's message, the bot's earlier replies, the recalled facts."""

    user_text: str
    earlier_replies: tuple[str, ...] = ()
    memories: tuple[str, ...] = ()
    user_name: str | None = None
    given: str = ""  # the rest of the prompt's context (FAQ entries, profile): links and numbers it holds are given

    def check(self, reply: str) -> Verdict:
        return check_reply(reply, user_text=self.user_text, earlier_replies=list(self.earlier_replies),
                           memories=list(self.memories), user_name=self.user_name, given=self.given)


def fallback_reply(user_text: str, earlier: tuple[str, ...] = ()) -> str:
    """A short honest reply: a statement told back ("Noted: you moved to Lyon."), else a fixed wording that is
    not one of the conversation's earlier replies."""
    statement = memory_text(user_text)
    options: list[str] = []
    if statement:
        if OWN_STATEMENT.match(statement) and not SENTENCE.search(statement.strip()) \
                and len(words(statement)) <= TOLD_BACK_WORDS:
            told = second_person(statement)
            options.append("Noted: " + told[:1].lower() + told[1:])
        options += FALLBACKS_STATEMENT
    else:
        options += FALLBACKS_OTHER
    said = {tuple(words(text)) for text in earlier}
    return next((o for o in options if tuple(words(o)) not in said), options[0])


def told_again(answer: str, earlier: tuple[str, ...]) -> str:
    """The user's own facts told back (a fixed answer), said as a reminder when the same words are an earlier reply
    ("Noted: your name is Lena…" before "Your name is Lena…" → "As you told me, your name is Lena…")."""
    if repeat(words(answer), list(earlier)).ok:
        return answer
    return "As you told me, " + answer[:1].lower() + answer[1:]


def complete_sentences(pending: str) -> tuple[str, str]:
    """(the finished sentences of `pending`, the rest still being written); a long run-on counts as finished."""
    ends = [m.end() for m in BOUNDARY.finditer(pending)]
    if ends:
        return pending[:ends[-1]], pending[ends[-1]:]
    if len(words(pending)) >= FLUSH_WORDS:
        return pending, ""
    return "", pending


def excluded_from_history(guard: str | None) -> bool:
    """Whether a turn's reply must stay out of later prompts (one bad turn must not seed the next)."""
    return bool(guard) and (guard.endswith(":fallback") or guard.startswith("late:"))


def statements(turns) -> tuple[str, ...]:
    """What the user stated earlier in the conversation (their questions and requests left out): their facts
    too, whether or not recall brings them back for this message."""
    return tuple(kept for turn in turns if (kept := memory_text(turn.user_text)))


def history_messages(turns) -> list[dict[str, str]]:
    """Chat messages of earlier turns: unanswered ones (handoff) left out, degenerate replies left out."""
    messages = []
    for turn in turns:
        if turn.finish_reason in UNANSWERED or not (turn.reply or turn.finish_reason == "stop"):
            continue  # no bot reply (handoff, pending, interrupted, stopped at once): it would read as empty
        messages.append({"role": "user", "content": turn.user_text})
        if not excluded_from_history(getattr(turn, "guard", None)):
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


def banned_tokens(backend, verdict: Verdict, keep: str | None) -> tuple[int, ...]:
    """Token ids that start the copied words (the run's first word, its first-person words), in the
    spellings a reply uses; the user's name is never banned."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None or not verdict.copied:
        return ()
    chosen = [w for w in verdict.copied[:1] if w not in COMMON]
    chosen += [w for w in verdict.copied if w in FIRST]
    protected = set(words(keep or ""))
    ids: set[int] = set()
    for word in dict.fromkeys(chosen):
        if word in protected:
            continue
        for spelling in {word, word.capitalize(), "I" + word[1:] if word.startswith("i") else word}:
            for text in (spelling, " " + spelling):
                encoded = tokenizer.encode(text, add_special_tokens=False)
                if encoded:
                    ids.add(int(encoded[0]))
    return tuple(sorted(ids))


def copy_sources(backend, inputs: GuardInputs) -> tuple[tuple[int, ...], ...]:
    """What the reply may not copy COPY_RUN tokens of in a row, as token ids: every run of the user's message that
    carries their voice (a token of I/my/you…: the runs an echo is made of; "moved to Porto last year" may come
    back as an answer) and the bot's earlier replies whole. Each voiced token gives the stretch of tokens around
    it in which every run holds it."""
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        return ()
    user = tokenizer(inputs.user_text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [m.span() for m in WORD.finditer(inputs.user_text.lower().replace("’", "'"))
             if m.group() in FIRST | SECOND]
    voiced = [i for i, (start, end) in enumerate(user["offset_mapping"])
              if any(start < b and a < end for a, b in spans)]
    user = user["input_ids"]
    stretches = {tuple(user[max(0, i - COPY_RUN + 1):i + COPY_RUN]) for i in voiced}
    replies = {tuple(tokenizer.encode(reply, add_special_tokens=False)) for reply in inputs.earlier_replies if reply.strip()}
    return tuple(sorted(source for source in stretches | replies if len(source) >= COPY_RUN))


def retry_params(params: GenerationParams, banned: tuple[int, ...]) -> GenerationParams:
    return replace(params, temperature=max(params.temperature, RETRY_TEMPERATURE),
                   repetition_penalty=max(params.repetition_penalty, RETRY_REPETITION_PENALTY),
                   seed=int.from_bytes(os.urandom(4), "little"), banned_token_ids=banned)


class GuardedGeneration:
    """Iterate for text deltas (streaming with hold-back) or await `text()` (the whole reply checked first)."""

    def __init__(self, backend, messages: list[dict[str, str]], params: GenerationParams,
                 adapter: AdapterRef | None, inputs: GuardInputs) -> None:
        self.backend, self.messages, self.adapter, self.inputs = backend, messages, adapter, inputs
        # most echoes and repeats are never generated: the sampler will not complete a copied run (local model)
        self.params = replace(params, avoid_copying=copy_sources(backend, inputs))
        self.generation = None  # the last one made (its counters go on the turn)
        self.completion_tokens = 0  # over every try
        self.outcome: str | None = None
        self.verdicts: list[Verdict] = []

    async def _start(self, params: GenerationParams):
        if self.generation is not None:
            self.completion_tokens += self.generation.completion_tokens
        self.generation = await self.backend.generate(self.messages, params, self.adapter)
        return self.generation

    def _retry(self, verdict: Verdict) -> GenerationParams:
        self.verdicts.append(verdict)
        logger.info("guard caught %s (%.2f); generating again", verdict.kind, verdict.score)
        return retry_params(self.params, banned_tokens(self.backend, verdict, self.inputs.user_name))

    def _fallback(self, verdict: Verdict) -> str:
        self.verdicts.append(verdict)
        self.outcome = f"{self.verdicts[0].kind}:fallback"
        logger.info("guard caught %s again; falling back", verdict.kind)
        return fallback_reply(self.inputs.user_text, self.inputs.earlier_replies)

    def _check_sentences(self, text: str) -> Verdict:
        """The first sentence of `text` (what follows the opening) that fails the guard, as its verdict."""
        for sentence in SENTENCE.split(text):
            if words(sentence):
                verdict = self.inputs.check(sentence)
                if not verdict.ok:
                    return verdict
        return Verdict()

    async def text(self) -> str:
        """The whole reply, checked; for replies that are checked again after (grounded FAQ answers)."""
        params = self.params
        for attempt in (1, 2):
            text = await (await self._start(params)).text()
            verdict = self.inputs.check(text)
            if verdict.kind == "empty":
                self.outcome = "empty"
                return text
            if verdict.ok:
                self.outcome = f"{self.verdicts[0].kind}:regenerated" if self.verdicts else None
                return text
            if attempt == 1:
                params = self._retry(verdict)
        return self._fallback(verdict)

    async def __aiter__(self) -> AsyncIterator[str]:
        params = self.params
        for attempt in (1, 2):
            generation = await self._start(params)
            held: list[str] = []
            verdict = Verdict()
            stream = generation.__aiter__()
            finished = True
            async for chunk in stream:
                held.append(chunk)
                if len(held) >= HOLD_CHUNKS or len(words("".join(held))) >= HOLD_WORDS:
                    finished = False
                    break
            opening = "".join(held)
            verdict = self.inputs.check(opening)
            if verdict.kind == "empty" and not finished:
                verdict = Verdict()  # blank so far: nothing to judge yet, stream on
            if verdict.kind == "empty":  # the whole reply was blank
                # not retried: each channel has its answer to a blank reply (Chatwoot hands over to a person)
                self.outcome = "empty"
                if opening:
                    yield opening
                return
            if verdict.ok:
                break
            await stream.aclose()  # frees the model's slot at its next step
            if attempt == 1:
                params = self._retry(verdict)
        else:
            yield self._fallback(verdict)
            return
        self.outcome = f"{self.verdicts[0].kind}:regenerated" if self.verdicts else None
        yield opening
        shown, pending = opening, ""
        async for chunk in stream:
            pending += chunk
            done, pending = complete_sentences(pending)
            if done and not self._release(shown, done):
                await stream.aclose()
                return
            if done:
                shown += done
                yield done
        if pending.strip() and self.generation.finish_reason == "length" and complete_sentences(shown)[0].strip():
            return  # the budget ran out mid-sentence: the reply ends at its last full one (still "length")
        if pending.strip() and not self._release(shown, pending):
            return
        if pending:
            yield pending

    def _release(self, shown: str, text: str) -> bool:
        """Whether `text` (the next sentences) may follow `shown`; when not, the reply ends before it
        ("cut:<kind>"). A sentence begun in `shown` is checked whole."""
        _, begun = complete_sentences(shown + " ")
        verdict = self._check_sentences(begun.strip() + " " + text if begun.strip() else text)
        if verdict.ok:  # and the whole so far: a reply can repeat an earlier one a phrase in each sentence
            verdict = self.inputs.check(shown + text)
        if verdict.ok or verdict.kind == "empty":  # blank so far: nothing to judge yet, as for the opening
            return True
        self.verdicts.append(verdict)
        self.outcome = f"cut:{verdict.kind}"
        logger.info("guard cut the reply before a sentence (%s)", verdict.kind)
        return False

    @property
    def fell_back(self) -> bool:
        return bool(self.outcome) and self.outcome.endswith(":fallback")

    @property
    def finish_reason(self) -> str | None:
        """"stop" for a reply the guard ended (fallback, cut), else the generation's own."""
        if self.fell_back or (self.outcome or "").startswith("cut:"):
            return "stop"
        return self.generation.finish_reason if self.generation else None

    @property
    def total_completion_tokens(self) -> int:
        return self.completion_tokens + (self.generation.completion_tokens if self.generation else 0)
