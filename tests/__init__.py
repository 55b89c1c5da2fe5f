"""precog_db's test suite (a package, so helpers are imported as ``tests._helpers.…``)."""
