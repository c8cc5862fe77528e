"""``lora-merge strategies [NAME]``: the registered merge strategies and their options."""

from __future__ import annotations

import click

from .common import print_json


@click.command("strategies", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def strategies(name: str | None, as_json: bool) -> None:
    """List merge strategies, or show one strategy's parameters."""
    from ..strategies import available_strategies, get_strategy

    if name:
        show(get_strategy(name).describe(), as_json)
        return
    show([cls.describe() for cls in available_strategies().values()], as_json)


def show(infos: list[dict] | dict, as_json: bool) -> None:
    """Print the strategies' ``describe()`` dicts (a list: the table; one dict: its parameters); also what
    :mod:`lora_merge.cli.fast` prints from the built-in catalogue."""
    if isinstance(infos, dict):
        if as_json:
            print_json(infos)
            return
        _show_one(infos)
        return
    if as_json:
        print_json(infos)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="merge strategies")
    for col in ("name", "exact", "description", "options"):
        t.add_column(col, overflow="fold")
    for i in infos:
        t.add_row(
            i["name"],
            "yes" if i["exact"] else "no",
            i["description"],
            " ".join(p["option"] for p in i["params"]) or "-",
        )
    Console().print(t)


def _show_one(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{info['name']}[/bold] — {info['description']}")
    c.print(f"exact: {'yes' if info['exact'] else 'no'}")
    if info["reference"]:
        c.print(f"reference: {info['reference']}")
    if not info["params"]:
        c.print("options: none")
        return
    t = Table()
    for col in ("option", "type", "default", "range / choices", "help"):
        t.add_column(col, overflow="fold")
    for p in info["params"]:
        rng = (
            "|".join(p["choices"])
            if p["choices"]
            else (f"[{p['range'][0]}, {p['range'][1]}]" if p["range"] else "")
        )
        t.add_row(p["option"], p["type"], str(p["default"]), rng, p["help"])
    c.print(t)
