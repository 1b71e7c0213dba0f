"""Read-through caches of the bucket's immutable facts, for one warm function container.

Only facts that never change once written are cached: write-once cohort configs,
phase manifests and identities, committed versions' schemas, member messages by key
and ETag (a rewritten object has a new ETag), and cohorts known to be closed. So a
warm Lambda container never acts on stale state: anything that can still change
(check-ins, whether a phase has closed, whether a result exists) is read afresh,
and a missing object is never cached as missing.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

from fedcore import layout
from fedcore.errors import IntegrityError, NotFoundError
from fedcore.layout import Phase
from fedcore.messages import (
    CohortConfig,
    Manifest,
    Result,
    parse_config,
    parse_manifest,
    parse_result,
)
from fedcore.secagg import admission
from fedcore.secagg.protocol import KeysMsg, SharesMsg, UnmaskMsg, parse_identity, pinned_identity
from fedcore.server.vocabulary import PHASES, phase_kind, secagg_params
from fedcore.status import cohort_ids
from fedcore.storage import ObjectStore
from fedcore.versions import read_schema

# Concurrent GETs of small protocol messages (keys, shares, unmask) and identities.
PREFETCH_CONCURRENCY = 16

Schema = dict[str, tuple[str, tuple[int, ...]]]
Message = KeysMsg | SharesMsg | UnmaskMsg


class Cache:
    """The coordinator's reads: each fact fetched once, then served from memory."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._configs: dict[str, CohortConfig] = {}
        self._identities: dict[str, bytes] = {}
        self._messages: dict[tuple[str, str], Message] = {}
        self._manifests: dict[tuple[str, Phase], Manifest] = {}
        self._graphs: dict[str, dict[str, set[str]]] = {}
        self._prefetched: dict[str, bytes] = {}
        self._sizes: dict[str, int] = {}  # member object key -> size as last listed
        self._schemas: dict[int, Schema] = {}
        self._closed: set[str] = set()

    # -- write-once objects -------------------------------------------------
    def config(self, cid: str) -> CohortConfig:
        if cid not in self._configs:
            key = layout.config_key(cid)
            self._configs[cid] = parse_config(self.store.get(key).body, where=key)
        return self._configs[cid]

    def remember_config(self, cfg: CohortConfig) -> None:
        """A config this container just wrote (write-once, so it is what anyone reads)."""
        self._configs[cfg.cohort_id] = cfg

    def identity(self, client: str) -> bytes:
        """A member's enrolled Ed25519 public key (``clients/{id}/identity.json``, write-once)."""
        if client not in self._identities:
            key = layout.identity_key(client)
            try:
                blob = self.store.get(key).body
            except NotFoundError:
                raise IntegrityError(f"{key}: {client} has no enrolled identity") from None
            self._identities[client] = parse_identity(blob, client_id=client, where=key).ed25519
        return self._identities[client]

    def member_identity(self, cfg: CohortConfig, client: str) -> bytes:
        """A member's Ed25519 key as pinned in the cohort config (enrolled key otherwise)."""
        return pinned_identity(cfg.identities, client) or self.identity(client)

    def manifest(self, cid: str, phase: Phase) -> Manifest | None:
        """A phase's write-once manifest (cached once seen: it never changes)."""
        if (cid, phase) in self._manifests:
            return self._manifests[(cid, phase)]
        key = layout.state_key(cid, phase)
        try:
            m = parse_manifest(self.store.get(key).body, where=key)
        except NotFoundError:
            return None
        self._manifests[(cid, phase)] = m
        return m

    def schema(self, version: int) -> Schema:
        """A version's tensor schema (cached: a committed version never changes)."""
        if version not in self._schemas:
            self._schemas[version] = read_schema(self.store, version)
        return self._schemas[version]

    def graph(self, cfg: CohortConfig) -> dict[str, set[str]]:
        """The cohort's SecAgg+ neighbour graph (derived from the config, so fixed)."""
        if cfg.cohort_id not in self._graphs:
            self._graphs[cfg.cohort_id] = secagg_params(cfg).graph(sorted(cfg.members))
        return self._graphs[cfg.cohort_id]

    def expected(self, cid: str, cfg: CohortConfig, phase: Phase) -> list[str] | None:
        """Who may write in ``phase``: the members, or the previous phase's manifest."""
        phases = PHASES[cfg.mode]
        i = phases.index(phase)
        if i == 0:
            return sorted(cfg.members)
        prev = self.manifest(cid, phases[i - 1])
        return None if prev is None else prev.members

    # -- results and closed cohorts -------------------------------------------
    def result(self, cid: str) -> Result | None:
        key = layout.state_key(cid, Phase.RESULT)
        try:
            return parse_result(self.store.get(key).body, where=key)
        except NotFoundError:
            return None

    def mark_closed(self, cid: str) -> None:
        """The cohort has a result: ``open_cohorts`` no longer asks."""
        self._closed.add(cid)

    def cohort_ids(self) -> list[str]:
        return cohort_ids(self.store)

    def open_cohorts(self) -> list[str]:
        """Cohorts without a result, oldest first (closed ones are remembered)."""
        return self.open(self.cohort_ids())

    def open(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` without a result."""
        out = []
        for cid in ids:
            if cid in self._closed:
                continue
            if self.store.head(layout.state_key(cid, Phase.RESULT)) is not None:
                self._closed.add(cid)
                continue
            out.append(cid)
        return out

    # -- member objects -------------------------------------------------------
    def note_size(self, key: str, size: int) -> None:
        """A member object's size as listed (checked against the phase's cap, unread)."""
        self._sizes[key] = size

    def size(self, key: str) -> int:
        return self._sizes.get(key, 0)

    def prefetch(self, cid: str, cfg: CohortConfig, phase: Phase, present: dict[str, str]) -> None:
        """Download, concurrently, the messages and identities ``message`` will need.

        A cohort of n costs 3n small GETs per finalize; one at a time they took
        most of the function's time (benchmarks/secagg.py).
        """
        kind = phase_kind(phase, cfg.mode)
        keys = [
            layout.member_key(cid, kind, c)
            for c, etag in present.items()
            if (layout.member_key(cid, kind, c), etag) not in self._messages
        ]

        def message(key: str) -> None:
            with contextlib.suppress(NotFoundError):  # reported when validated
                self._prefetched[key] = self.store.get(key).body

        self.prefetch_identities(cfg, list(present))
        with ThreadPoolExecutor(max_workers=PREFETCH_CONCURRENCY) as pool:
            list(pool.map(message, keys))

    def prefetch_identities(self, cfg: CohortConfig, clients: list[str]) -> None:
        """Fetch, concurrently, the enrolled keys of members the config does not pin."""

        def identity(client: str) -> None:
            with contextlib.suppress(IntegrityError):  # reported when validated
                self.identity(client)

        missing = [c for c in clients if c not in cfg.identities and c not in self._identities]
        with ThreadPoolExecutor(max_workers=PREFETCH_CONCURRENCY) as pool:
            list(pool.map(identity, missing))

    def message(self, cid: str, cfg: CohortConfig, phase: Phase, client: str, etag: str) -> Message:
        """A member's admitted message in a JSON phase (cached by key and ETag).

        The body must have been prefetched (``prefetch``); the admission rules are
        ``fedcore.secagg.admission``'s, given who was counted in the earlier rounds.
        """
        key = layout.member_key(cid, phase_kind(phase, cfg.mode), client)
        if (key, etag) in self._messages:
            return self._messages[(key, etag)]
        if (blob := self._prefetched.pop(key, None)) is None:  # every caller prefetches first
            raise NotFoundError(f"{key}: gone before it could be read")
        identity = self.member_identity(cfg, client)
        neighbours = self.graph(cfg)[client] if phase is not Phase.KEYS else set()
        msg: Message
        if phase is Phase.KEYS:
            msg = admission.admit_keys(
                blob, identity=identity, cohort_id=cid, client_id=client, where=key
            )
        elif phase is Phase.SHARES:
            msg = admission.admit_shares(
                blob, identity=identity, cohort_id=cid, client_id=client, where=key,
                neighbours=neighbours, u1=set(self.expected(cid, cfg, Phase.SHARES) or []),
            )  # fmt: skip
        elif phase is Phase.UNMASK:
            msg = admission.admit_unmask(
                blob, identity=identity, cohort_id=cid, client_id=client, where=key,
                neighbours=neighbours, u2=set(self.expected(cid, cfg, Phase.INPUTS) or []),
                u3=set(self.expected(cid, cfg, Phase.UNMASK) or []),
            )  # fmt: skip
        else:  # pragma: no cover - inputs are validated while summing
            raise ValueError(phase)
        self._messages[(key, etag)] = msg
        return msg

    def public_values(self, cfg: CohortConfig, manifest: Manifest) -> dict[str, str]:
        """Each member's verified public value, from the manifest or, failing that, its message."""
        phase = Phase(manifest.phase)
        out = {c: manifest.verified[c] for c in manifest.members if c in manifest.verified}
        missing = {c: manifest.etags[c] for c in manifest.members if c not in out}
        if missing:  # a manifest written before ``verified`` existed
            self.prefetch(cfg.cohort_id, cfg, phase, missing)
            for c, etag in missing.items():
                msg = self.message(cfg.cohort_id, cfg, phase, c, etag)
                out[c] = admission.public_value(msg)  # type: ignore[assignment]
        return out
