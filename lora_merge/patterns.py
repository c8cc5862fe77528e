"""Module-name patterns used by ``--weight PATTERN=W`` and the ``blocks`` strategy.

A pattern selects the modules whose canonical name (e.g.
``unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``) contains it as a run of whole
dot-separated components.  ``up_blocks.0.attentions.1`` therefore matches every layer inside that
sub-block but not ``up_blocks.0.attentions.10``.  Glob characters are allowed inside the pattern:
``*`` matches any characters (dots included), ``?`` one character, ``[...]`` a set.  A pattern that
starts with ``re:`` is a Python regular expression searched anywhere in the name.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import UsageError


def _glob_to_regex(glob: str) -> str:
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile a module pattern (see the module docstring) into a regex to ``search`` with."""
    if not pattern or not pattern.strip():
        raise UsageError("empty module pattern")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"bad regular expression in pattern {pattern!r}: {exc}") from None
    return re.compile(r"(?:^|\.)" + _glob_to_regex(pattern.strip()) + r"(?:\.|$)")


def matches(pattern: str, name: str) -> bool:
    return compile_pattern(pattern).search(name) is not None
