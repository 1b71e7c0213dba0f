"""Many simulated devices on one machine: ``worker`` plays them, ``simulation`` runs workers.

This package sits between the device code and the tools that start servers:
it imports ``edge_client`` and ``fedcore`` and never ``infra`` (what boots a
local stack around a simulation is ``infra.simulate``). ``tests/unit/test_layers.py``
holds it to that.
"""
