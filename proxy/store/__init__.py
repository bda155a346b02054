"""The durable local store: AuditEvents with their own delivery state, and write intents.

Its users hold it by one of its faces (:mod:`proxy.store.faces`); the proxy opens
:class:`~proxy.store.queue.AuditQueue`, one store file serving all three, and reads several
workers' files as one through :class:`~proxy.store.shards.ShardedStore`. Appends are made
durable by a writer process (:mod:`proxy.store.engine`, :mod:`proxy.store.writer_process`)
whose transaction is a sequence of named steps (:mod:`proxy.store.transaction`); the
records (:mod:`proxy.store.records`) declare the columns, and :mod:`proxy.store.tables`
makes the SQL from them.
"""
