"""`rapport keys create|list|revoke`: API keys that belong to an integration (stored hashed, shown once)."""

from __future__ import annotations

import click

from bot.cli.common import emit_json, services


@click.group("keys")
def keys_group() -> None:
    """API keys: each belongs to an integration with a user-id namespace and scopes."""


@keys_group.command("create")
@click.argument("name")
@click.option("--scopes", default="chat,memory", show_default=True, help="comma-separated: chat, memory, admin")
@click.option("--namespace", default=None, help="the integration's user-id namespace; default = NAME")
@click.option("--rate", type=float, default=None, help="the key's requests a minute (default RAPPORT_API_RATE_PER_MINUTE; 0: no limit)")
@click.option("--user-rate", type=float, default=None,
              help="each of its users' requests a minute (default RAPPORT_API_USER_RATE_PER_MINUTE; 0: no limit)")
@click.option("--json", "as_json", is_flag=True, help="print {name, namespace, scopes, key}")
def create(name: str, scopes: str, namespace: str | None, rate: float | None, user_rate: float | None,
           as_json: bool) -> None:
    """A new integration and its key; the key is printed once and never stored."""
    with services() as opened:
        integration, key = opened.integrations.create(name, scopes=scopes, namespace=namespace, rate_per_minute=rate,
                                                      user_rate_per_minute=user_rate)
    namespace = integration.namespace if integration.namespace else "(admin: full ids)"
    if as_json:
        emit_json({"name": integration.name, "namespace": namespace, "scopes": sorted(integration.scopes), "key": key})
        return
    click.echo(f"integration {integration.name} (id {integration.id}), namespace {namespace}, "
               f"scopes {','.join(sorted(integration.scopes))}")
    click.echo(f"key (shown once, store it now): {key}")


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_keys(as_json: bool) -> None:
    """Integrations, active and revoked (never their keys)."""
    with services() as opened:
        rows = opened.integrations.list()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no integrations (create one with `rapport keys create NAME --scopes chat,memory`)")
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        click.echo(f"{row['id']:>4}  {row['name']:<20} ns={row['namespace'] or '*'}  "
                   f"scopes={','.join(row['scopes'])}  rate={_rate(row['rate_per_minute'])}  "
                   f"user_rate={_rate(row['user_rate_per_minute'])}  {state}")


def _rate(per_minute: float | None) -> str:
    return "default" if per_minute is None else ("none" if per_minute == 0 else f"{per_minute:g}/min")


@keys_group.command("revoke")
@click.argument("name_or_id")
def revoke(name_or_id: str) -> None:
    """Revoke an integration's key by name or id; it stops working at once."""
    with services() as opened:
        integration = opened.integrations.revoke(name_or_id)
    click.echo(f"revoked {integration.name} (id {integration.id})")
