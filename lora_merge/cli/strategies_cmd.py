"""``lora-merge strategies [NAME]``: the registered merge strategies and their options, and the
sampling-time mergers (K-LoRA, timestep-split, plug-ins), which no file can hold; both listings are the
classes' ``describe()``, generated from their ``Param`` declarations."""

from __future__ import annotations

import click

from .common import print_json


@click.command("strategies", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--sampling-time", "sampling_time", is_flag=True,
              help="List only the sampling-time mergers (k-lora, timestep-split): applied while sampling, "
                   "through the Python API; they cannot be saved as one LoRA file. With --json: "
                   "{\"sampling_time\": [...]}.")
def strategies(name: str | None, as_json: bool, sampling_time: bool) -> None:
    """List merge strategies, or show one strategy's parameters. The list ends with the sampling-time
    mergers (k-lora, timestep-split), which run while sampling and cannot be saved as a file (not in
    --json's list; see --sampling-time)."""
    from ..sampling_time import available_sampling_time
    from ..strategies import available_strategies, get_strategy

    samplers = [cls.describe() for cls in available_sampling_time().values()]
    if sampling_time and not name:
        show_sampling_time(samplers, as_json)
        return
    if name:
        hit = next((m for m in samplers if m["name"] == name), None)
        show(hit if hit is not None else get_strategy(name).describe(), as_json)
        return
    show([cls.describe() for cls in available_strategies().values()], as_json, samplers)


def show(infos: list[dict] | dict, as_json: bool, sampling_time: list[dict] | None = None) -> None:
    """Print the strategies' ``describe()`` dicts (a list: the table, then the ``sampling_time`` mergers'
    table in text; one dict: its parameters); also what :mod:`lora_merge.cli.fast` prints from the
    built-in catalogue.  ``--json`` of the list stays the list of merge strategies (each one usable with
    ``merge -s``); ``--sampling-time --json`` prints the others."""
    if isinstance(infos, dict):
        if as_json:
            print_json(infos)
            return
        if infos.get("static_file") is False:
            _show_sampling_one(infos)
        else:
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
    if sampling_time:
        show_sampling_time(sampling_time, False)


def show_sampling_time(infos: list[dict], as_json: bool) -> None:
    """The sampling-time mergers: methods that pick per layer and per denoising step, so no file holds them."""
    if as_json:
        print_json({"sampling_time": infos})
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="sampling-time mergers (Python API only; cannot be saved as one LoRA file)")
    for col in ("name", "description", "parameters"):
        t.add_column(col, overflow="fold")
    for i in infos:
        t.add_row(i["name"], i["description"], " ".join(p["name"] for p in i["params"]) or "-")
    Console().print(t)


def _show_sampling_one(info: dict) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{info['name']}[/bold] — {info['description']}")
    c.print("sampling-time: applied while sampling; it cannot be saved as one LoRA file (`merge -s` refuses it)")
    c.print(f"python: {info['api']}")
    if info.get("reference"):
        c.print(f"reference: {info['reference']}")
    c.print(_param_table(info["params"], "parameter", "name"))


def _show_one(info: dict) -> None:
    from rich.console import Console

    c = Console()
    c.print(f"[bold]{info['name']}[/bold] — {info['description']}")
    c.print(f"exact: {'yes' if info['exact'] else 'no'}")
    if info["reference"]:
        c.print(f"reference: {info['reference']}")
    if not info["params"]:
        c.print("options: none")
        return
    c.print(_param_table(info["params"], "option", "option"))


def _param_table(params: list[dict], title: str, key: str):
    """The parameters of a ``describe()`` listing as a table whose first column is ``params[i][key]``."""
    from rich.table import Table

    t = Table()
    for col in (title, "type", "default", "range / choices", "help"):
        t.add_column(col, overflow="fold")
    for p in params:
        t.add_row(p[key], p["type"], str(p["default"]), _range(p), p["help"])
    return t


def _range(p: dict) -> str:
    if p.get("choices"):
        return "|".join(p["choices"])
    return f"[{p['range'][0]}, {p['range'][1]}]" if p.get("range") else ""
