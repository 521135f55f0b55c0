"""Ferry storage: SQL models and repositories, Redis event streams, migrations."""
