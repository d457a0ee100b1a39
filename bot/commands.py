"""The slash commands, written once: the REPL and Telegram both run them through `Commands`.

A command takes who is asking and what they typed after its name, and returns the text to show. A usage
mistake or an unknown id raises `InvalidInput` or `NotFound`, whose message is fit to show as is (each channel
shows errors its own way). What only one channel can do stays in it: `/quit` (the REPL's loop), `/start` and
`/delete_me` (Telegram's greeting and confirmation buttons), how `/new` names the next conversation, and how
an export is handed over (a file in Telegram, JSON on the terminal).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass

from bot.services import Services
from dialogue.errors import InvalidInput
from dialogue.manager import HandedOff, Reply

MAX_MEMORY_LINES = 30
MAX_MEMORY_CHARS = 300  # per memory in /memory; /export has them whole
VERDICTS = {"up": 1, "+1": 1, "good": 1, "down": -1, "-1": -1, "bad": -1}


@dataclass(frozen=True)
class Command:
    name: str
    usage: str  # what may follow the name
    summary: str

    def line(self, width: int) -> str:
        return f"  {f'/{self.name} {self.usage}'.rstrip():<{width}}  {self.summary}"


COMMANDS = {c.name: c for c in (
    Command("start", "", "greeting and what I keep about you"),
    Command("help", "", "this list"),
    Command("new", "", "start a new conversation (memories and persona stay)"),
    Command("rate", "up|down [comment]", "rate my last reply (it teaches the next version of me)"),
    Command("persona", "[set key=value]", "show or change what I know about how to talk to you"),
    Command("memory", "", "list what I remember about you"),
    Command("forget", "ID|all", "forget one memory, or all of them"),
    Command("sources", "", "where my last reply came from"),
    Command("export", "", "everything I keep about you, as JSON"),
    Command("delete_me", "", "erase everything I keep about you"),
    Command("quit", "", "leave (Ctrl-D works too)"),
)}


def help_text(names: Iterable[str]) -> str:
    """The command list of a channel, in the order given."""
    listed = [COMMANDS[name] for name in names]
    width = max(len(f"/{c.name} {c.usage}".rstrip()) for c in listed)
    return "Commands:\n" + "\n".join(c.line(width) for c in listed)


def usage(name: str) -> str:
    command = COMMANDS[name]
    return f"Usage: /{name} {command.usage}".rstrip()


class Commands:
    """The commands every channel shares, over one process's services."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def persona(self, user_id: str, args: str) -> str:
        """`/persona` shows the profile; `/persona set key=value` changes one field ("" clears it)."""
        personas = self.services.personas
        prefix = ""
        if args:
            verb, _, assignment = args.partition(" ")
            key, eq, value = assignment.partition("=")
            if verb.lower() != "set" or not eq or not key.strip():
                raise InvalidInput(f"{usage('persona')}  (for example /persona set name=Lena; an empty value "
                                   "clears the field)")
            await asyncio.to_thread(personas.update, user_id, {key.strip(): value.strip()})
            prefix = f"Saved {key.strip()}.\n"
        persona = await asyncio.to_thread(personas.get, user_id)
        fields = {k: v for k, v in persona.to_json().items() if v}
        if not fields:
            return prefix + "I know nothing about you yet. Tell me, or use /persona set name=Lena."
        lines = [f"  {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in fields.items()]
        return prefix + "What I know about how to talk to you:\n" + "\n".join(lines)

    async def memory(self, user_id: str, args: str = "") -> str:
        """What is remembered about the user, newest first, with the ids /forget takes."""
        items = await asyncio.to_thread(self.services.memory.for_user(user_id).list)
        if not items:
            return "I remember nothing about you yet."
        lines = [f"  {m.id}  {_shorten(m.text)}" for m in items[:MAX_MEMORY_LINES]]
        if len(items) > MAX_MEMORY_LINES:
            lines.append(f"  …and {len(items) - MAX_MEMORY_LINES} more (/export has them all).")
        return f"What I remember, newest first ({len(items)}; /forget ID or /forget all):\n" + "\n".join(lines)

    async def forget(self, user_id: str, args: str) -> str:
        """Forget one memory by id, or all of them; NotFound for an id that is not this user's."""
        memory = self.services.memory.for_user(user_id)
        target = args.strip()
        if not target or " " in target:
            raise InvalidInput(f"{usage('forget')}  (the ids are in /memory)")
        if target.lower() == "all":
            count = await asyncio.to_thread(memory.forget_all)
            return f"Forgot everything I remembered ({count} memories)."
        await asyncio.to_thread(memory.forget, target)
        return f"Forgot {target}."

    async def rate(self, user_id: str, last: Reply | None, args: str) -> str:
        """`/rate up|down [comment]` on the last reply; repeated downs hand the conversation to a person."""
        verdict, _, comment = args.strip().partition(" ")
        rating = VERDICTS.get(verdict.lower())
        if rating is None:
            raise InvalidInput(usage("rate"))
        if last is None or not last.recorded or isinstance(last, HandedOff):
            raise InvalidInput("There is no reply of mine to rate yet.")
        handed_off = await self.services.manager.rate(turn_id=last.turn_id, rating=rating, user_id=user_id,
                                                      comment=comment.strip() or None)
        if handed_off:
            return "Thanks, noted. I'm handing this conversation to a colleague, who will reply here."
        return "Thanks, noted." if rating > 0 else "Thanks, noted. I'll try to do better."

    @staticmethod
    def sources(last: Reply | None) -> str:
        """Where the last reply came from: FAQ entries, memories, profile fields, with their scores."""
        if last is None:
            return "There is no reply yet."
        if not last.sources:
            return "My last reply used no FAQ entry, memory or profile field."
        return "My last reply came from:\n" + "\n".join(f"  {s.kind}:{s.id}  score {s.score:.2f}" for s in last.sources)

    async def export(self, user_id: str) -> str:
        """Everything kept about the user, as one JSON document."""
        data = await asyncio.to_thread(self.services.export_user, user_id)
        return json.dumps(data, ensure_ascii=False, indent=2, default=str)


def _shorten(text: str, limit: int = MAX_MEMORY_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
