"""Which engine replica most likely holds a prompt's prefix in its KV cache (pure).

The prompt text is cut into blocks of `block_chars` characters and hashed as a chain (each
block's hash covers every block before it, as vLLM's prefix cache hashes token blocks), so a
chain hash names a whole prefix. Routing a request to a replica records its chain under that
replica; a new request's longest recorded chain names the replica that served the longest
common prefix most recently. Bounded: least recently used chains are dropped past
`max_entries`. Text, not tokens: the router runs in the ingress, which does not tokenize.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


class PrefixIndex:
    def __init__(self, block_chars: int = 128, max_entries: int = 100_000) -> None:
        self.block_chars = block_chars
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def _chain(self, text: str) -> list[bytes]:
        hashes: list[bytes] = []
        state = b""
        for start in range(0, len(text) - len(text) % self.block_chars, self.block_chars):
            block = text[start : start + self.block_chars].encode()
            state = hashlib.blake2b(state + block, digest_size=16).digest()
            hashes.append(state)
        return hashes

    def match(self, text: str) -> tuple[str | None, int]:
        """(replica that served the longest recorded prefix of `text`, its length in chars)."""
        owner, matched = None, 0
        for i, h in enumerate(self._chain(text)):
            found = self._owner.get(h)
            if found is None:
                break
            owner, matched = found, (i + 1) * self.block_chars
        return owner, matched

    def record(self, text: str, replica: str) -> None:
        """`replica` now holds `text`'s prefix (it was routed there)."""
        for h in self._chain(text):
            self._owner[h] = replica
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica is gone: its cache with it."""
        for h in [h for h, r in self._owner.items() if r == replica]:
            del self._owner[h]

    def __len__(self) -> int:
        return len(self._owner)
