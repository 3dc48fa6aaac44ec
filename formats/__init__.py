"""The on-disk packed-shard dataset format: schema, writer, reader, manifest, integrity checks. No torch."""
