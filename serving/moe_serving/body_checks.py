"""Checks of a parsed request body that neither JSON parsing nor vLLM's request models make.

Python's `json` accepts escapes of lone UTF-16 surrogates (`"\\ud800"`), which are not Unicode
text: the tokenizer then fails deep inside vLLM (an internal error). Such a body is the client's
mistake and gets a 400 / INVALID_ARGUMENT here, before the engine sees it.
"""

from __future__ import annotations

import json
from typing import Any


def text_problem(body: Any) -> str | None:
    """Why the strings of `body` are not valid Unicode text, or None when they are."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        return (
            f"request contains text that is not valid Unicode (lone surrogate {bad!r}): "
            "send UTF-8 text"
        )
    except (RecursionError, ValueError) as exc:
        return f"request body cannot be read as JSON text: {exc}"
    return None
