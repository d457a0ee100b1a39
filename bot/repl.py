"""The terminal REPL: prompt_toolkit input with history, streamed replies, slash commands.

With stdin not a terminal it reads one message per line, prints each reply, and exits at end of input.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from bot.commands import Commands, help_text
from bot.services import Services
from dialogue.errors import InvalidInput, NotFound, RapportError, StoreUnavailable
from dialogue.model.files import ModelNotFound
from dialogue.manager import Reply, interrupted_notice
from dialogue.store import new_id
from memory.text import CONTROL_CHARS

REPL_COMMANDS = ("help", "new", "rate", "persona", "memory", "forget", "sources", "export", "quit")
HELP = help_text(REPL_COMMANDS) + "\nCtrl-C stops a reply without leaving."


def printable(text: str) -> str:
    """Text with terminal control sequences defused (their ESC and other control bytes removed)."""
    return CONTROL_CHARS.sub("", text)


@dataclass
class ChatSession:
    """One user's REPL state; channel-independent so piped and interactive modes share it."""

    services: Services
    user_id: str
    conversation_id: str = field(default_factory=new_id)
    last_reply: Reply | None = None

    def __post_init__(self) -> None:
        self.commands = Commands(self.services)

    async def command(self, line: str) -> str | None:
        """Run a slash command; returns the text to show (a mistake's message included), or None to quit."""
        name, _, args = line[1:].partition(" ")
        name, args = name.lower(), args.strip()
        if name not in REPL_COMMANDS and name != "exit":
            return f"Unknown command /{name}. Type /help for the list."
        try:
            return await self._run(name, args)
        except (InvalidInput, NotFound) as exc:
            return str(exc)

    async def _run(self, name: str, args: str) -> str | None:
        c = self.commands
        if name in ("quit", "exit"):
            return None
        if name == "help":
            return HELP
        if name == "new":
            self.conversation_id, self.last_reply = new_id(), None
            return "Started a new conversation. I still remember you: /memory and /persona show what I know."
        if name == "rate":
            return await c.rate(self.user_id, self.last_reply, args)
        if name == "sources":
            return c.sources(self.last_reply)
        if name == "export":
            return await c.export(self.user_id)
        if name == "persona":
            return await c.persona(self.user_id, args)
        if name == "memory":
            return await c.memory(self.user_id)
        return await c.forget(self.user_id, args)

    async def interrupted(self) -> list[str]:
        """Close this user's REPL turns that a dead process (a closed terminal, kill -9) left unanswered, and say
        so once each; other users' turns are theirs to be told of."""
        turns = await asyncio.to_thread(self.services.manager.close_abandoned, channels={"repl"},
                                        user_id=self.user_id)
        return [interrupted_notice(turn.user_text) for turn in turns]

    async def prepare(self, text: str) -> Reply:
        """The reply to `text`, ready to stream; a fixed answer does not wait for the model to load."""
        self.last_reply = await self.services.manager.respond(user_id=self.user_id, conversation_id=self.conversation_id,
                                                              text=text, channel="repl")
        return self.last_reply

    @staticmethod
    async def stream(reply: Reply, write: Callable[[str], None], notice: Callable[[str], None]) -> Reply:
        for line in reply.notices:
            notice(line)
        async for chunk in reply:
            write(printable(chunk))
        return reply

    async def reply(self, text: str, write: Callable[[str], None], notice: Callable[[str], None]) -> Reply:
        return await self.stream(await self.prepare(text), write, notice)


def run_piped(session: ChatSession, stdin=None, stdout=None) -> int:
    """One message per input line; each reply printed on its own; exit 0 at end of input."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def notice(text: str) -> None:
        print(f"[{text}]", file=sys.stderr)

    with asyncio.Runner() as runner:
        for line in runner.run(session.interrupted()):
            notice(line)
        for raw in stdin:
            line = printable(raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw).strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    out = runner.run(session.command(line))
                    if out is None:
                        break
                    write(out + "\n")
                else:
                    runner.run(session.reply(line, write, notice))
                    write("\n")
            except ModelNotFound:  # a model that cannot load is fatal, not per line
                raise
            except RapportError as exc:
                print(f"error: {exc}", file=sys.stderr)
    return 0


def run_interactive(session: ChatSession, history_file: Path) -> int:
    """The terminal REPL; the model keeps loading in the background while the prompt is already up."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory

    console = Console(highlight=False)
    history_file.parent.mkdir(parents=True, exist_ok=True)
    prompt = PromptSession(history=FileHistory(str(history_file)))
    console.print(f"[bold]Rapport[/bold] — talking with [cyan]{escape(session.user_id)}[/cyan]. "
                  "Type /help for commands; Ctrl-C stops a reply, Ctrl-D leaves.")

    def write(text: str) -> None:
        console.out(text, end="", highlight=False)

    def notice(text: str) -> None:
        console.print(f"[yellow]{escape(text)}[/yellow]")

    with asyncio.Runner() as runner:
        for line in runner.run(session.interrupted()):
            notice(line)
        while True:
            try:
                line = runner.run(prompt.prompt_async("you › "))
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            line = printable(line).strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    out = runner.run(session.command(line))
                    if out is None:
                        break
                    console.print(escape(out))
                    continue
                reply = None
                reply = runner.run(session.prepare(line))
                if reply.needs_model and not session.services.backend.is_ready():
                    with console.status("Loading the model…"):
                        runner.run(session.services.backend.ready())  # a load failure ends the REPL
                console.print("[bold magenta]rapport ›[/bold magenta] ", end="")
                runner.run(session.stream(reply, write, notice))
                console.print()
            except KeyboardInterrupt:
                if reply is not None:
                    reply.discard()  # stopped before its first word: closed as interrupted, not left pending
                console.print(" [dim](stopped)[/dim]")
            except RapportError as exc:
                if isinstance(exc, StoreUnavailable):  # the model or a store is gone: nothing more can work
                    raise
                console.print(f"[red]error:[/red] {escape(str(exc))}")
    console.print("Bye.")
    return 0
