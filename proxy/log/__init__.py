"""The audit trail as a transparency log: per store shard, an append-only RFC 6962 Merkle
tree over the stored events (:mod:`proxy.log.tree`, each event's leaf made from its
canonical entry, :mod:`proxy.log.entry`), signed checkpoints in the C2SP formats
(:mod:`proxy.log.note`, :mod:`proxy.log.checkpoint`), served as C2SP tiles
(:mod:`proxy.log.tiles`), shipped to the repository beside the events
(:mod:`proxy.log.fhir`) and checked by ``fhir-audit-proxy log verify``
(:mod:`proxy.log.verify`).

The leaves are written by the store's writer process in the same transaction as their
events (the ``append leaves`` step of :mod:`proxy.store.transaction`, over
:mod:`proxy.store.leaves`); everything here but :mod:`proxy.log.checkpointer` and the
store reads of :mod:`proxy.log.verify` is pure.
"""
