"""Server side of secure aggregation: the masked sum and the unmasking.

The function only ever holds (a) single masked uploads, each uniformly
random on its own, (b) their running sum modulo 2^32, and (c) after the
Unmask round, the self-mask seeds of members *in* the sum and the mask keys
of members *not* in it, never both for one member (``unmask`` refuses and the
cohort aborts). There is no code path here that decodes an individual update:
only the final, unmasked sum is dequantized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.codec import (
    check_schema,
    decode_tensors,
    encode_tensors,
    load_json_object,
    max_update_bytes,
    parse_header,
)
from fedcore.dp.distributed import DistributedDP
from fedcore.errors import FedError, IntegrityError
from fedcore.secagg import crypto, shamir
from fedcore.secagg.masking import remove_masks
from fedcore.secagg.protocol import (
    MASKED_TENSOR,
    MaskedMeta,
    SecAggParams,
    UnmaskMsg,
    commit_seed,
    member_index,
    parse_masked_metadata,
)
from fedcore.server.aggregate import stream_objects
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)

# Threads that regenerate masks at finalize. AES-CTR (cryptography's update_into)
# and numpy's adds release the GIL, so on a Lambda with two vCPUs (1769 MB and up)
# the ~k * |dropped| + |U3| mask expansions take half the time.
MASK_THREADS = 2


class UnmaskError(FedError):
    """The cohort cannot be unmasked safely; it must abort without revealing anything."""


@dataclass
class MaskedSum:
    total: np.ndarray
    included: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    train_s: dict[str, float] = field(default_factory=dict)  # included members that reported it
    samples: dict[str, int] = field(default_factory=dict)  # included members' declared counts


def check_masked(
    blob: bytes,
    *,
    where: str,
    length: int,
    identity: bytes,
    cohort_id: str,
    client_id: str,
    base_version: int,
    require_samples: bool = False,
) -> tuple[np.ndarray, MaskedMeta]:
    """Validate one masked upload; its uint32 vector (a view of ``blob``) and signed metadata.

    With ``require_samples`` (cohorts without user-level DP) the signed metadata must
    declare the member's sample count (>= 1), for the weight-slot check after
    unmasking (``check_weight_slot``).
    """
    cap = max_update_bytes({MASKED_TENSOR: ("U32", (length,))}, "U32")
    if len(blob) > cap:
        raise IntegrityError(f"{where}: upload of {len(blob)} bytes exceeds the {cap}-byte cap")
    tensors, meta = decode_tensors(blob, where=where, schema={MASKED_TENSOR: ("U32", (length,))})
    signed = parse_masked_metadata(
        meta, identity=identity, cohort_id=cohort_id, client_id=client_id, where=where
    )
    vec = tensors[MASKED_TENSOR]
    if signed.base_version != base_version or signed.length != length:
        raise IntegrityError(
            f"{where}: signed for base {signed.base_version}/length {signed.length}"
        )
    if hashlib.sha256(memoryview(vec)).hexdigest() != signed.digest:
        raise IntegrityError(f"{where}: data does not match its signed digest (tampered)")
    if require_samples and signed.samples is None:
        raise IntegrityError(f"{where}: no signed sample count (declared weight)")
    return vec, signed


def masked_sum(
    store: ObjectStore,
    uploads: list[tuple[str, str]],
    *,
    check: Callable[[str, str, bytes], tuple[np.ndarray, MaskedMeta]],
    length: int,
    concurrency: int = 4,
    cohort_id: str | None = None,
) -> MaskedSum:
    """Stream the modular sum of the valid uploads ((client, key) pairs); O(model) memory."""
    out = MaskedSum(np.zeros(length, dtype=np.uint32), [])

    def fold(client: str, key: str, fut: Future[tuple[int, tuple[np.ndarray, MaskedMeta]]]) -> None:
        try:
            size, (vec, signed) = fut.result()
            out.bytes_read += size
            out.total += vec
        except FedError as exc:
            out.rejected[client] = str(exc)
            log.warning(
                "masked input rejected; treated as a dropout",
                extra={"cohort_id": cohort_id, "client_id": client, "key": key, "reason": str(exc)},
            )
            return
        out.included.append(client)
        if signed.train_s is not None:
            out.train_s[client] = signed.train_s
        if signed.samples is not None:
            out.samples[client] = signed.samples

    for client, key, fut in stream_objects(store, uploads, concurrency=concurrency, parse=check):
        fold(client, key, fut)
    out.included.sort()
    return out


def sum_digest(members: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(members)).encode()).hexdigest()[:16]


def encode_sum(
    total: np.ndarray, members: list[str], cohort_id: str, metrics: Mapping[str, Any] | None = None
) -> bytes:
    """The sum object; ``metrics`` (what the input round learnt for the version's metrics,
    such as the members' training seconds) ride along, and a sum without any keeps the
    bytes it had before they existed."""
    meta = {
        "format": "fedcore.masked-sum.v1",
        "cohort_id": cohort_id,
        "members": ",".join(sorted(members)),
    }
    if metrics:
        meta["metrics"] = json.dumps(dict(metrics), sort_keys=True)
    return encode_tensors({MASKED_TENSOR: total}, meta)


def sum_metrics(blob: bytes, *, where: str) -> dict[str, Any]:
    """The ``metrics`` ``encode_sum`` recorded ({} for a sum written without them)."""
    raw = parse_header(blob, where=where).metadata.get("metrics")
    if raw is None:
        return {}
    return load_json_object(raw.encode(), where=where, what="sum metrics")


def decode_sum(blob: bytes, *, where: str, length: int, members: list[str]) -> np.ndarray:
    header = parse_header(blob, where=where)
    check_schema(header, {MASKED_TENSOR: ("U32", (length,))}, where=where)
    if header.metadata.get("members") != ",".join(sorted(members)):
        raise IntegrityError(f"{where}: sums a different member set than the manifest")
    tensors, _ = decode_tensors(blob, where=where)
    return np.array(tensors[MASKED_TENSOR], dtype=np.uint32, copy=True)


def unmask(
    total: np.ndarray,
    *,
    cohort_id: str,
    params: SecAggParams,
    members: list[str],
    u2: list[str],
    u3: list[str],
    s_pks: Mapping[str, bytes],
    commits: Mapping[str, str],
    reveals: Mapping[str, UnmaskMsg],
) -> tuple[np.ndarray, dict[str, str]]:
    """Remove every mask from ``total`` (in place); returns it and the flagged bad revealers.

    Raises ``UnmaskError`` (the caller aborts) when some secret lacks t shares,
    fails its check, or when both kinds of share were revealed for one member.
    """
    graph = params.graph(members)
    survivors, dropped = set(u3), set(u2) - set(u3)
    self_shares: dict[str, dict[int, int]] = {v: {} for v in survivors}
    key_shares: dict[str, dict[int, int]] = {v: {} for v in dropped}
    flagged: dict[str, str] = {}
    for u, msg in reveals.items():
        for v, y in msg.self_shares.items():
            if v in dropped:
                raise UnmaskError(
                    f"{u} revealed a self-mask share of dropped member {v}: both kinds requested"
                )
            if v in survivors and (v in graph[u] or v == u):  # a member holds its own share
                self_shares[v][member_index(members, u)] = y
        for v, y in msg.key_shares.items():
            if v in survivors:
                raise UnmaskError(
                    f"{u} revealed a key share of surviving member {v}: both kinds requested"
                )
            if v in dropped and v in graph[u]:
                key_shares[v][member_index(members, u)] = y
    index_to_id = {member_index(members, m): m for m in members}

    def rebuild(v: str, pts: dict[int, int], kind: str, check: Callable[[bytes], bool]) -> bytes:
        if len(pts) < params.t:
            raise UnmaskError(f"only {len(pts)} {kind} shares of {v}, threshold {params.t}")
        try:
            secret, bad = shamir.reconstruct_robust(pts, threshold=params.t, max_bad=1)
        except shamir.InconsistentSharesError as exc:
            raise UnmaskError(f"{kind} shares of {v} inconsistent: {exc}") from None
        for x in bad:
            flagged[index_to_id[x]] = f"sent a bad {kind} share of {v}"
        if not check(secret):
            raise UnmaskError(f"reconstructed {kind} of {v} fails its commitment")
        return secret

    seeds = [
        rebuild(v, self_shares[v], "self-mask", lambda s, v=v: commit_seed(s) == commits[v])
        for v in sorted(survivors)
    ]
    dangling = []
    for v in sorted(dropped):
        s_sk = rebuild(
            v,
            key_shares[v],
            "mask-key",
            lambda s, v=v: len(s) == 32 and crypto.x25519_public(s) == s_pks[v],
        )
        for u in sorted(graph[v] & survivors):
            seed = crypto.pair_mask_seed(s_sk, s_pks[u], cohort_id=cohort_id, me=v, peer=u)
            dangling.append((u, v, seed))
    remove_masks_threaded(total, self_seeds=seeds, dangling=dangling)
    return total, flagged


def remove_masks_threaded(
    total: np.ndarray,
    *,
    self_seeds: list[bytes],
    dangling: list[tuple[str, str, bytes]],
    threads: int = MASK_THREADS,
) -> np.ndarray:
    """``remove_masks`` with the masks split over ``threads``; the same result mod 2^32.

    The calling thread strips its share of the masks from ``total`` in place;
    each other thread strips its share from a zero vector of its own, added
    to ``total`` at the end (uint32 addition wraps mod 2^32, so the order of
    the terms does not matter). Memory: ``threads - 1`` extra model-sized vectors.
    """
    if threads < 2 or len(self_seeds) + len(dangling) < 2 * threads:
        return remove_masks(total, self_seeds=self_seeds, dangling=dangling)
    groups = [(self_seeds[i::threads], dangling[i::threads]) for i in range(threads)]
    partials = [np.zeros_like(total) for _ in groups[1:]]
    with ThreadPoolExecutor(max_workers=threads - 1) as pool:
        futures = [
            pool.submit(remove_masks, part, self_seeds=seeds, dangling=pairs)
            for part, (seeds, pairs) in zip(partials, groups[1:], strict=True)
        ]
        remove_masks(total, self_seeds=groups[0][0], dangling=groups[0][1])
        for fut in futures:
            total += fut.result()
    return total


class BoundsError(UnmaskError):
    """The unmasked sum is outside what the counted members' honest encoders can produce.

    Raised before anything is committed: the cohort aborts and nothing is applied.
    """


def check_weight_slot(
    total: np.ndarray, *, params: SecAggParams, declared: Mapping[str, int]
) -> None:
    """The unmasked weight slot must equal the sum of the counted members' declared weights.

    Each member signs its sample count before masking (``MaskedMeta.samples``) and
    writes ``params.weight_code(samples)`` exactly in its weight slot, so the slot of
    the sum is known to the function without seeing any one input. A member that
    lies in its slot (a negative or huge weight would scale the applied update, or
    cancel the others') makes the cohort abort here, before anything is applied
    (``BoundsError``). ``declared`` names exactly the counted members.
    """
    expected = sum(params.weight_code(s) for s in declared.values()) % 2**32
    if int(total[-1]) != expected:
        raise BoundsError(
            f"weight slot {int(total[-1])} is not the sum {expected} of the {len(declared)} "
            "counted members' declared weights: some member lied about its weight"
        )


def decode_mean(
    total: np.ndarray,
    *,
    params: SecAggParams,
    count: int,
    schema: Mapping[str, tuple[str, tuple[int, ...]]],
) -> tuple[dict[str, np.ndarray], float]:
    """Weighted mean update and total weight from the unmasked sum of [w*delta, w] codes.

    Checks, before decoding, that the sum is one ``count`` honest members can produce
    (``BoundsError`` otherwise):

    - codes: each member's quantizer emits codes in [0, levels] and ``bits_for(n)``
      keeps ``count * levels`` below 2^32, so every coordinate of the sum, the weight
      slot included, lies in [0, count * levels];
    - weight: each member's weight is min(samples, cap) / cap in [1/cap, 1], clipped
      by the quantizer to the clip and rounded by less than one step, so the total
      lies in count * [min(1/cap, clip) - step, min(1, clip) + step];
    - L2: every coordinate of each member's w*delta is clipped to [-clip, clip], so
      the mean's coordinates are at most count * clip / W and its L2 norm at most
      sqrt(d) * count * clip / W (d parameters, W the decoded total weight). That is
      all the code guarantees without DP: the quantizer bounds coordinates, not
      norms, so this check follows from the two above and guards the decoding.
    """
    q = params.quantizer()
    limit = count * q.levels
    if (over := int(np.count_nonzero(total > limit))) > 0:
        raise BoundsError(
            f"{over} coordinates of the sum exceed {count} members' code range [0, {limit}]"
        )
    sums = q.dequantize_sum(total, count)
    weight = float(sums[-1])
    low = count * (min(1.0 / params.weight_cap, params.clip) - q.step)
    high = count * (min(1.0, params.clip) + q.step)
    if not (weight > 0 and low <= weight <= high):
        raise BoundsError(
            f"decoded total weight {weight:.6g} is outside [{low:.6g}, {high:.6g}], "
            f"what {count} honest members can declare"
        )
    mean = sums[:-1] / weight
    norm = float(np.linalg.norm(mean))
    bound = math.sqrt(mean.size) * count * (params.clip + q.step) / weight
    if not norm <= bound * (1 + 1e-9):
        raise BoundsError(f"mean update's L2 norm {norm:.6g} exceeds the honest bound {bound:.6g}")
    return unflatten(mean, schema), weight


def decode_dp_mean(
    total: np.ndarray,
    *,
    dp: DistributedDP,
    count: int,
    schema: Mapping[str, tuple[str, tuple[int, ...]]],
) -> dict[str, np.ndarray]:
    """Unweighted mean of ``count`` members' clipped, noised deltas (user-level DP).

    Every member's weight slot must hold the code of 1: a member that claims a
    larger weight would escape the clip, so the cohort aborts instead. The sum's
    codes and the mean's L2 norm must be ones ``count`` honest members can produce
    (``DistributedDP.check_sum``; ``BoundsError`` otherwise).
    """
    if int(total[-1]) != (count * dp.weight_code) % 2**32:
        raise BoundsError("weight slot is not the survivor count: some member did not use weight 1")
    try:
        mean = dp.decode_checked(total, count)
    except ValueError as exc:
        raise BoundsError(str(exc)) from None
    return unflatten(mean, schema)


def unflatten(
    vec: np.ndarray, schema: Mapping[str, tuple[str, tuple[int, ...]]]
) -> dict[str, np.ndarray]:
    """Tensors from a vector laid out in sorted-name order (float32)."""
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name in sorted(schema):
        shape = schema[name][1]
        size = int(np.prod(shape))
        out[name] = vec[offset : offset + size].astype(np.float32).reshape(shape)
        offset += size
    return out


def vector_length(schema: Mapping[str, tuple[str, tuple[int, ...]]]) -> int:
    """Length of the masked vector: every parameter (names sorted) plus one weight."""
    return sum(int(np.prod(shape)) for _, shape in schema.values()) + 1
