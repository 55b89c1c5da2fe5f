"""A throwaway local PostgreSQL for the demo, the tests and ``precog-db local``.

* `precog_db.local.binaries`: the one lookup of PostgreSQL binaries (server and
  client tools) and the one parser of their ``--version`` output;
* `precog_db.local.embedded`: the embedded server of the ``local`` extra (pgserver);
* `precog_db.local.cluster`: `LocalCluster` (``initdb``/``pg_ctl``) and `local_up`.

Imports flow one way, embedded ← binaries ← cluster; nothing here imports the
pool, and only `cluster` imports the driver.
"""
