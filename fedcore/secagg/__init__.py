"""Secure aggregation (Bonawitz et al. 2017, with Bell et al. 2020's sparse graph).

Pure functions only: Shamir sharing (``shamir``), key agreement, key
derivation, share encryption, signatures and mask expansion (``crypto``),
fixed-point quantization (``quantize``), the neighbour graph (``graph``),
the masking algebra (``masking``), and which round messages the function
admits and what it keeps from them (``admission``). The protocol rounds that
move these values through the bucket live in ``fedcore.participant`` (device)
and ``fedcore.server`` (function).
"""
