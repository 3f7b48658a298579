"""What `aligndata inspect` shows: numbers over shards and raw files, their checks, and their rendering."""
